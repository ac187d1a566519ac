"""Photoswap Attention Recorder and Attention Swap Sampler: thin wrappers over photoswap_core.recorder and
photoswap_core.swap_sampler."""
from __future__ import annotations

from comfy_api.latest import io

from .types import CATEGORY, FrameOptions, Inversion, Prompts, SourceTrace


def _progress():
    """A sampler callback driving a ComfyUI ProgressBar, made on the first step (when the step count is known)."""
    import comfy.utils

    bars = []

    def callback(step, x0, x, total_steps):
        if not bars:
            bars.append(comfy.utils.ProgressBar(total_steps))
        bars[0].update_absolute(step + 1, total_steps)

    return callback


class PhotoswapAttentionRecorder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PhotoswapAttentionRecorder",
            display_name="Photoswap Attention Recorder",
            category=f"{CATEGORY}/swap",
            description=(
                "Runs the source pass once and records what the swap needs: the source trajectory, null embeddings "
                "and, within a memory budget, the source attention tensors of the swap windows. With an inversion "
                "it reproduces the real photo; without one it generates the source image from a seed. Cached by "
                "ComfyUI, so re-tuning the swap windows re-runs only the sampler. On Flux the inversion already "
                "recorded steps 1 … N−1 on its way: with the same MODEL and source prompt (and no self maps) this "
                "node only adds step 0, one model call."),
            inputs=[
                io.Model.Input("model", tooltip="The model (with the concept) that the swap sampler will also use."),
                io.Conditioning.Input("source_positive", tooltip="The encoded source prompt (Prompt Pair's "
                                      "source_positive); must be the prompt the inversion was made with."),
                io.Conditioning.Input("negative", tooltip="The negative/empty prompt. For a synthetic source its "
                                      "embedding is the null embedding of every step; with an inversion the "
                                      "inversion's null embeddings are used and only its pooled output matters."),
                Inversion.Input("inversion", optional=True,
                                tooltip="A PHOTOSWAP_INVERSION of the real photo. Leave unconnected to generate a "
                                        "synthetic source from 'latent' and 'seed'."),
                io.Latent.Input("latent", optional=True,
                                tooltip="Synthetic source only: an empty latent giving the size (Empty Latent Image)."),
                io.Int.Input("seed", default=8888, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Synthetic source only: seed of the starting noise z_T."),
                io.Int.Input("steps", default=50, min=2, max=1000,
                             tooltip="Synthetic source only: DDIM steps (with an inversion its steps are used)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1,
                               tooltip="Guidance of the source pass (with an inversion its cfg is used). Use the same "
                                       "cfg in the swap sampler, or it runs in lockstep."),
                io.Float.Input("record_fraction", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Record the attention tensors for this fraction of the steps. The sampler's "
                                       "windows must fit inside it. 0 = record no tensors (the sampler runs lockstep)."),
                io.Boolean.Input("record_self_maps", default=False,
                                 tooltip="Also record source queries/keys for the self-attention MAP window (only "
                                         "needed when self_map > 0; costs memory)."),
                io.Combo.Input("storage", options=["auto", "device", "cpu"], default="auto",
                               tooltip="Where recorded tensors live: auto = on the GPU while within the budget, then "
                                       "offloaded to CPU; device; cpu."),
                io.Float.Input("memory_budget_gb", default=0.0, min=0.0, max=1024.0, step=0.5,
                               tooltip="Upper bound for the recorded tensors in GB; 0 = auto (half of free memory). "
                                       "Over budget, nothing is kept and the sampler runs lockstep."),
                FrameOptions.Input("frame_options", optional=True,
                                   tooltip="A clip (latent batch of frames): from Photoswap Frame Options; only its "
                                           "frames_per_batch matters here. Unconnected: as many frames per batch "
                                           "as fit."),
            ],
            outputs=[
                SourceTrace.Output(display_name="trace", tooltip="The PHOTOSWAP_SOURCE_TRACE for the swap sampler."),
                io.Latent.Output(display_name="source_latent", tooltip="The source pass's final latent (the "
                                 "reconstruction of the photo, or the synthetic source image)."),
            ],
        )

    @classmethod
    def execute(cls, model, source_positive, negative, inversion=None, latent=None, seed=8888, steps=50, cfg=7.5,
                record_fraction=1.0, record_self_maps=False, storage="auto", memory_budget_gb=0.0,
                frame_options=None) -> io.NodeOutput:
        from ..photoswap_core.recorder import record_source

        per_batch = frame_options.frames_per_batch if frame_options is not None else 0
        trace, source = record_source(model, source_positive, negative, inversion=inversion, latent=latent, seed=seed,
                                      steps=steps, cfg=cfg, fraction=record_fraction,
                                      record_self_maps=record_self_maps, storage=storage,
                                      memory_budget_gb=memory_budget_gb, callback=_progress(),
                                      frames_per_batch=per_batch)
        return io.NodeOutput(trace, source)


class PhotoswapAttentionSwapSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PhotoswapAttentionSwapSampler",
            display_name="Photoswap Attention Swap Sampler",
            category=f"{CATEGORY}/swap",
            description=(
                "Generates the target image while swapping the source pass's self-attention outputs, self-attention "
                "maps and cross-attention maps into it (Photoswap), with LocalBlend keeping the background. Samples "
                "through ComfyUI's own sampling, so LoRA patches and ControlNet on the target conditioning work. "
                "Uses the recorded trace when it holds the tensors, else runs source and target in lockstep."),
            inputs=[
                io.Model.Input("model", tooltip="The same MODEL the recorder used (same checkpoint and LoRAs)."),
                SourceTrace.Input("trace", tooltip="From Photoswap Attention Recorder."),
                io.Conditioning.Input("target_positive", tooltip="The encoded target prompt (Prompt Pair's "
                                      "target_positive); ControlNet Apply may sit on it."),
                io.Conditioning.Input("negative", tooltip="The negative prompt. Its text embedding is replaced by the "
                                      "trace's per-step null embeddings (as in the reference); ControlNet on it "
                                      "still applies."),
                Prompts.Input("prompts", tooltip="From Photoswap Prompt Pair: token alignment and subject tokens."),
                io.Float.Input("self_output", default=0.8, min=0.0, max=1.0, step=0.01,
                               tooltip="Self-attention OUTPUT swap window (fraction of steps, from the start). Carries "
                                       "the source's layout and pose; higher = closer to the source, less identity. "
                                       "Notebook: 0.8; paper: λ_φ = 10/50 = 0.2. 0 = off."),
                io.Float.Input("self_map", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Self-attention MAP swap window, starting where self_output ends (the windows "
                                       "add). Notebook: 0.0; paper: λ_M = 25/50. Needs record_self_maps in the "
                                       "recorder (else lockstep)."),
                io.Float.Input("cross_map", default=0.6, min=0.0, max=1.0, step=0.01,
                               tooltip="Cross-attention MAP swap window: the target's word columns take the source's "
                                       "(the concept token keeps its own). Notebook: 0.6; paper: λ_A = 20/50 = 0.4."),
                io.Boolean.Input("local_blend", default=True,
                                 tooltip="LocalBlend (official code): outside the subject masks the target latent is "
                                         "pulled back to the source, keeping the background."),
                io.Float.Input("blend_threshold", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="LocalBlend mask threshold on the normalised subject attention (0.3); also "
                                       "the threshold of the region words' maps."),
                io.Float.Input("blend_start", default=0.2, min=0.0, max=1.0, step=0.01,
                               tooltip="LocalBlend starts after this fraction of the steps (0.2)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1,
                               tooltip="Guidance scale; keep the inversion's/recorder's cfg (7.5) for a faithful "
                                       "source. A different cfg runs in lockstep."),
                io.Boolean.Input("force_lockstep", default=False,
                                 tooltip="Ignore recorded tensors and run source and target rows together (slower, "
                                         "no trace memory; same result)."),
                io.Mask.Input("region_mask", optional=True,
                              tooltip="Optional explicit region (any ComfyUI mask, white = swap): outside it the "
                                      "result is the source, inside it the swap; combined with the Prompt Pair's "
                                      "region words. Resized to the latent by area averaging; one mask, or "
                                      "one per frame for a clip."),
                FrameOptions.Input("frame_options", optional=True,
                                   tooltip="A clip (latent batch of frames): from Photoswap Frame Options "
                                           "(frame_attention, keyframes, frames per batch). Unconnected: "
                                           "frame_attention 'first', as many frames per batch as fit."),
            ],
            outputs=[
                io.Latent.Output(display_name="swapped", tooltip="The target latent (decode with VAE Decode)."),
                io.Latent.Output(display_name="source", tooltip="The source reconstruction latent."),
                io.Mask.Output(display_name="blend_mask",
                               tooltip="The last mask the swap used at image size: LocalBlend's, within the regions, "
                                       "all subject pairs united (all ones when neither LocalBlend nor a region is "
                                       "on)."),
                io.Mask.Output(display_name="pair_masks",
                               tooltip="The same per subject pair, as a batch (one mask per pair, in the Prompt "
                                       "Pair's order)."),
            ],
        )

    @classmethod
    def execute(cls, model, trace, target_positive, negative, prompts, self_output=0.8, self_map=0.0, cross_map=0.6,
                local_blend=True, blend_threshold=0.3, blend_start=0.2, cfg=7.5,
                force_lockstep=False, region_mask=None, frame_options=None) -> io.NodeOutput:
        from ..photoswap_core.frames import FrameOptions as Options
        from ..photoswap_core.swap_rules import SwapWindows
        from ..photoswap_core.swap_sampler import swap_images

        windows = SwapWindows(self_output, self_map, cross_map, local_blend, blend_threshold, blend_start)
        options = (frame_options or Options()).check()
        swapped, source, mask, pair_masks = swap_images(
            model, trace, target_positive, negative, prompts, windows, cfg, lockstep=force_lockstep,
            callback=_progress(), region_mask=region_mask, frame_attention=options.frame_attention,
            keyframe_interval=options.keyframe_interval, frames_per_batch=options.frames_per_batch)
        return io.NodeOutput(swapped, source, mask, pair_masks)


class PhotoswapFrameOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from ..photoswap_core.frames import DEFAULT_FRAME_ATTENTION, DEFAULT_KEYFRAME_INTERVAL, FRAME_ATTENTION

        return io.Schema(
            node_id="PhotoswapFrameOptions",
            display_name="Photoswap Frame Options",
            category=f"{CATEGORY}/swap",
            description=(
                "How a clip is swapped: a latent batch of F frames (VAE Encode of a video's frames) is one clip; "
                "each frame is inverted and reconstructed on its own, and in the target pass every frame's "
                "self-attention also looks at anchor frames so the new subject stays the same from frame to frame. "
                "Connect to the Swap Sampler (and the Recorder / Inversion for frames_per_batch)."),
            inputs=[
                io.Combo.Input("frame_attention", options=list(FRAME_ATTENTION), default=DEFAULT_FRAME_ATTENTION,
                               tooltip="Cross-frame attention in the target pass: off = every frame alone; first = "
                                       "every frame also attends to frame 0 (default); first+previous = to frame 0 "
                                       "and the frame before (needs all frames in one batch); keyframes = every "
                                       "k-th frame is a keyframe, the others attend to their last keyframe."),
                io.Int.Input("keyframe_interval", default=DEFAULT_KEYFRAME_INTERVAL, min=1, max=1000,
                             tooltip="keyframes only: every this many frames is a keyframe (0, k, 2k, …)."),
                io.Int.Input("frames_per_batch", default=0, min=0, max=4096,
                             tooltip="Frames per model call (memory): 0 = as many as fit. The result does not "
                                     "depend on it (each batch recomputes the anchor frames it needs)."),
            ],
            outputs=[FrameOptions.Output(display_name="frame_options",
                                         tooltip="PHOTOSWAP_FRAME_OPTIONS for the Swap Sampler, Recorder and "
                                                 "Inversion.")],
        )

    @classmethod
    def execute(cls, frame_attention="first", keyframe_interval=4, frames_per_batch=0) -> io.NodeOutput:
        from ..photoswap_core.frames import FrameOptions as Options

        return io.NodeOutput(Options(frame_attention, int(keyframe_interval), int(frames_per_batch)).check())


NODES = [PhotoswapAttentionRecorder, PhotoswapAttentionSwapSampler, PhotoswapFrameOptions]
