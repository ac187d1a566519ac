"""The demo's workflow, kept apart from the machinery that runs it (scripts/run_demo.py), so it can be swapped.

For now: the smoke workflow of core nodes on the random SD1.5 checkpoint. A later issue replaces this module's
`build_graph` by the Photoswap workflow; the runner only relies on the names below.
"""
from __future__ import annotations

TITLE = "smoke workflow (core ComfyUI nodes: CheckpointLoaderSimple → CLIPTextEncode → KSampler → VAEDecode → SaveImage)"
CHECKPOINTS = ("sd15",)  # cached random checkpoints the server must have (devtools.checkpoints families)
RANDOM_WEIGHTS_NOTE = ("The checkpoint has RANDOM weights (devtools/checkpoints.py): the image is noise. It shows that "
                       "the pipeline runs, not what a trained model would produce.")


def prepare_inputs(input_dir) -> None:
    """Put the input files the graph needs into the server's input folder (none for the smoke workflow)."""


def build_graph(checkpoint: str = "random-sd15.safetensors", width: int = 64, height: int = 64, steps: int = 4,
                seed: int = 0, prefix: str = "photoswap_demo/smoke") -> dict:
    """API-format graph (what POST /prompt takes)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a cat on a sofa"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                  "latent_image": ["4", 0], "seed": seed, "steps": steps, "cfg": 7.0,
                                                  "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }
