"""The target pass (Attention Swap Sampler): generate the target while swapping the source's attention into it.

From a recorded trace (its tensors) or in lockstep (source and target rows computed together every step, the same
arithmetic: trace ≡ lockstep is an invariant test). Everything else is in sampling.py and attention_patch.py.
"""
from __future__ import annotations

import logging
from enum import Enum
from typing import NamedTuple

import torch

from . import frames
from .arch import inspect_model
from .attention_patch import RunMode, SwapRun, patch_model
from .errors import PhotoswapInputError
from .evaluator import DirectEvaluator
from .recorder import TraceRecorder, y_only
from .sampling import SamplingPlan, sample
from .trace import SourceTrace

log = logging.getLogger("photoswap")

TRACE_FIX = "connect the same MODEL (same checkpoint and LoRAs) to the Recorder and the Swap Sampler"


class SwapMode(str, Enum):
    TRACE = "target"  # the source tensors come from the recorded trace
    LOCKSTEP = "lockstep"  # the source row is recomputed beside the target row every step


class SwapResult(NamedTuple):
    target: torch.Tensor  # LATENT samples of the swapped target
    source: torch.Tensor  # LATENT samples of the source reconstruction
    mask: torch.Tensor | None  # the last combined mask [1, 1, h, w] (latent size), None when none was used
    mode: SwapMode
    pair_masks: torch.Tensor | None = None  # the last mask of each subject pair [P, 1, h, w], or None


def region_at_latent(mask, latent_hw: tuple, frames: int = 1) -> torch.Tensor | None:
    """An explicit region (a ComfyUI MASK [H, W] or [M, H, W], any size, values in [0, 1]; M = 1 for every frame or
    one per frame) as [M, 1, h, w] at the latent size: resized by area averaging, clamped to [0, 1]."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 3):
        raise PhotoswapInputError("region_mask", f"a MASK [H, W] or [1, H, W] (got {getattr(mask, 'shape', mask)})",
                                  "connect a mask from a ComfyUI mask node (Load Image (as Mask), Solid Mask, …)")
    mask = mask.reshape(-1, *mask.shape[-2:])
    if mask.shape[0] not in (1, frames):
        what = "one mask for the one image" if frames == 1 else f"one mask, or one per frame ({frames})"
        raise PhotoswapInputError(
            "region_mask", f"{what} (got a batch of {mask.shape[0]})",
            "pick one mask of the batch (e.g. with the core Mask From Batch / ImageFromBatch nodes)" if frames == 1
            else f"connect a mask batch of {frames} (one per frame, e.g. from the same video) or a single mask")
    if not torch.isfinite(mask).all():
        raise PhotoswapInputError("region_mask", "finite mask values (found NaN or Inf)", "check the mask's source")
    resized = torch.nn.functional.interpolate(mask[:, None].float().cpu(), size=tuple(latent_hw), mode="area")
    return resized.clamp(0.0, 1.0)


def check_trace(model, trace: SourceTrace, input_name: str = "trace"):
    """The trace must come from this MODEL; returns the model's architecture."""
    arch = inspect_model(model)
    arch.check_same_model(model, trace.arch, trace.weights_fingerprint, input_name, "the trace", TRACE_FIX)
    return arch


def choose_mode(trace: SourceTrace, windows, cfg: float, lockstep: bool) -> SwapMode:
    """Validate the windows and cfg against the trace; the recorded trace when it serves them, else lockstep."""
    if trace.method == "null_text" and cfg == 1.0:
        raise PhotoswapInputError(
            "cfg", "cfg > 1 with a null-text inversion (its optimised null embeddings act only through the "
                   "unconditional branch, which ComfyUI skips at cfg 1)",
            f"use the inversion's cfg ({trace.cfg:g}), or invert with method 'direct' for cfg 1")
    windows.validate(trace.record_fraction if (trace.has_attention and not lockstep) else None)
    if trace.method == "null_text" and abs(cfg - trace.cfg) > 1e-6:
        log.warning("Photoswap: sampling at cfg %.2f but the null-text embeddings were optimised for cfg %.2f",
                    cfg, trace.cfg)
    if not trace.has_attention or lockstep:
        return SwapMode.LOCKSTEP
    if windows.self_map > 0 and not trace.self_maps_recorded:
        log.warning("Photoswap: the trace holds no self-attention maps (record_self_maps was off); running lockstep")
        return SwapMode.LOCKSTEP
    if windows.sites is not None and windows.sites.blend is not None:
        log.info("Photoswap: LocalBlend sites differ from the trace's (its source maps sum the default sites); "
                 "running lockstep")
        return SwapMode.LOCKSTEP
    if abs(cfg - trace.cfg) > 1e-9:
        log.warning("Photoswap: cfg %.2f differs from the trace's %.2f; running lockstep", cfg, trace.cfg)
        return SwapMode.LOCKSTEP
    return SwapMode.TRACE


def swap(model, trace: SourceTrace, target_positive, negative, prompts, windows, cfg, lockstep=False,
         callback=None, region_mask=None, frame_attention=frames.DEFAULT_FRAME_ATTENTION,
         keyframe_interval=frames.DEFAULT_KEYFRAME_INTERVAL, frames_per_batch=0) -> SwapResult:
    """The target pass. `region_mask`: an explicit region (a MASK) outside which the result is the source. A trace
    of F frames is a clip: `frames_per_batch` output frames at a time, each batch with its anchor frames."""
    arch = check_trace(model, trace)
    arch.prompt_entry(model, target_positive, "target_positive")
    arch.prompt_entry(model, negative, "negative")
    frames.check_mode(frame_attention, keyframe_interval)
    arch.check_guidance(None, cfg)
    mode = choose_mode(trace, windows, cfg, lockstep)
    region = region_at_latent(region_mask, trace.latent_shape[-2:], trace.frames)
    parts = frames.plan(model, trace.frames, trace.latent_shape, frames_per_batch, frame_attention,
                        keyframe_interval, rows_per_frame=4 if mode is SwapMode.LOCKSTEP else 2)
    results, done = [], 0
    for chunk in parts:
        sub_region = None if region is None or region.shape[0] == 1 else region[list(chunk.frames)]
        run_options = dict(frame_ids=chunk.frames, frame_attention=frame_attention, keyframe_interval=keyframe_interval)
        result = _swap_batch(model, arch, trace.select_frames(chunk.frames), mode, target_positive, negative,
                             prompts, windows, cfg, _frame_progress(callback, done, len(chunk.outputs), trace),
                             region if sub_region is None else sub_region, run_options)
        results.append((chunk, result))
        done += len(chunk.outputs)
    return _join(results, mode)


def _frame_progress(callback, done: int, count: int, trace: SourceTrace):
    """A sampler callback of one batch reporting frames × steps of the whole clip."""
    if callback is None:
        return None
    steps = trace.steps
    return lambda step, x0, x, _total: callback(done * steps + (step + 1) * count - 1, x0, x, trace.frames * steps)


def _join(results: list, mode) -> SwapResult:
    """The clip's result from its batches' (their output frames only); masks per frame, pair masks pair-major."""
    if len(results) == 1 and results[0][0].outputs == tuple(range(len(results[0][0].frames))):
        return results[0][1]

    def per_frame(t, chunk):  # [P·F_batch or P, 1, h, w] → [P, outputs, 1, h, w]
        count = len(chunk.frames)
        t = t.reshape(-1, 1 if t.shape[0] % count else count, *t.shape[1:])
        return t.expand(-1, count, *t.shape[2:])[:, list(chunk.outputs)]

    target = torch.cat([r.target[list(c.outputs)] for c, r in results])
    source = torch.cat([r.source[list(c.outputs)] for c, r in results])
    mask = pair_masks = None
    if all(r.mask is not None for _, r in results):
        mask = torch.cat([per_frame(r.mask[:1] if r.mask.shape[0] == 1 else r.mask, c) for c, r in results],
                         dim=1)[0]
    if all(r.pair_masks is not None for _, r in results):
        pair_masks = torch.cat([per_frame(r.pair_masks, c) for c, r in results], dim=1).flatten(0, 1)
    return SwapResult(target, source, mask, mode, pair_masks)


def _swap_batch(model, arch, trace: SourceTrace, mode, target_positive, negative, prompts, windows, cfg, callback,
                region, run_options) -> SwapResult:
    """One batch of frames through the target pass (the whole image or clip when it fits)."""
    evaluator = DirectEvaluator(model, trace.latent_shape, arch=arch)
    device = evaluator.device
    plan = SamplingPlan(scales=arch.sampler_scales(trace.schedule.sigmas))
    plan.trajectory_k = [t.to(device) * plan.scales[i] for i, t in enumerate(trace.trajectory)]
    if mode is SwapMode.LOCKSTEP:
        plan.step_recorder = TraceRecorder(trace.steps, windows, True, device, storage="device")
        source_store, source_blend_maps = plan.step_recorder.store, plan.step_recorder.blend_maps
    else:
        plan.source_steps = [c.to(device) for c in trace.source_steps_k]
        source_store = trace.store
        # on the device once here: the per-step LocalBlend reads them, and a host-to-device copy there would block
        source_blend_maps = [m.to(device) if m is not None else None for m in trace.blend_maps]
    run = SwapRun(arch, RunMode.TARGET, trace.steps, windows, source_store=source_store,
                  source_blend_maps=source_blend_maps, prompts=prompts,
                  null_embeddings=trace.null_embeddings.to(device),
                  source_kwargs=evaluator.model_kwargs(trace.source_conditioning[0]),
                  uncond_kwargs=y_only(evaluator.model_kwargs(trace.negative_conditioning[0])),
                  recorder=plan.step_recorder, device=device,
                  source_blend_grid=trace.blend_grid if mode is SwapMode.TRACE else None,
                  region_mask=None if region is None else region.to(device), **run_options)
    start = plan.trajectory_k[0]
    try:
        out = sample(patch_model(model, run), run, plan, arch.to_latent(start.cpu()), trace.schedule.sigmas,
                     target_positive, negative, cfg, callback)
    finally:
        if source_store is not None:
            source_store.release_staged()
    final_scale = plan.scales[-1]
    target = out / final_scale
    # the same arithmetic as the target row's path (sampler space → LATENT, then the sampler-space factor), so equal
    # rows give equal outputs
    source = arch.to_latent(plan.trajectory_k[-1].to(out.device)) / final_scale
    return SwapResult(target, source, plan.last_mask, mode, run.masks.pair_masks)


def swap_images(model, trace: SourceTrace, target_positive, negative, prompts, windows, cfg, lockstep=False,
                callback=None, region_mask=None, frame_attention=frames.DEFAULT_FRAME_ATTENTION,
                keyframe_interval=frames.DEFAULT_KEYFRAME_INTERVAL, frames_per_batch=0):
    """The Swap Sampler's stage: (swapped LATENT, source LATENT, combined MASK, per-pair MASK batch), masks at image
    size; all ones where no mask was used. A clip: one mask per frame, the pair masks pair-major (P × F)."""
    result = swap(model, trace, target_positive, negative, prompts, windows, cfg, lockstep, callback, region_mask,
                  frame_attention, keyframe_interval, frames_per_batch)
    f, (h, w) = result.target.shape[0], result.target.shape[-2:]
    pairs = max(1, len(getattr(prompts, "subjects", ()) or ()))
    mask = result.mask if result.mask is not None else torch.ones(1, 1, h, w)
    mask = mask.expand(f, *mask.shape[1:]) if mask.shape[0] == 1 else mask
    pair_masks = result.pair_masks if result.pair_masks is not None else torch.ones(pairs * f, 1, h, w)

    def at_image_size(m):
        return torch.nn.functional.interpolate(m.float().cpu(), scale_factor=trace.arch.latent.downscale,
                                               mode="nearest")[:, 0]

    return ({"samples": result.target.cpu()}, {"samples": result.source.cpu()}, at_image_size(mask),
            at_image_size(pair_masks))
