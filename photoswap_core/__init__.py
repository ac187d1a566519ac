"""The Photoswap algorithm on ComfyUI's model objects: schedule, inversion, prompt alignment, swap rules,
attention patch, trace store, LocalBlend. Depends on torch and ComfyUI APIs, never on node classes."""
