"""The target pass (Attention Swap Sampler): generate the target while swapping the source's attention into it.

From a recorded trace (its tensors) or in lockstep (source and target rows computed together every step, the same
arithmetic: trace ≡ lockstep is an invariant test). Everything else is in sampling.py and attention_patch.py.
"""
from __future__ import annotations

import logging
from enum import Enum
from typing import NamedTuple

import torch

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


def region_at_latent(mask, latent_hw: tuple) -> torch.Tensor | None:
    """An explicit region (a ComfyUI MASK [H, W] or [1, H, W], any size, values in [0, 1]) as [1, 1, h, w] at the
    latent size: resized by area averaging (a block of pixels per latent cell), clamped to [0, 1]."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 3):
        raise PhotoswapInputError("region_mask", f"a MASK [H, W] or [1, H, W] (got {getattr(mask, 'shape', mask)})",
                                  "connect a mask from a ComfyUI mask node (Load Image (as Mask), Solid Mask, …)")
    mask = mask.reshape(-1, *mask.shape[-2:])
    if mask.shape[0] != 1:
        raise PhotoswapInputError(
            "region_mask", f"one mask for the one image (got a batch of {mask.shape[0]})",
            "pick one mask of the batch (e.g. with the core Mask From Batch / ImageFromBatch nodes)")
    if not torch.isfinite(mask).all():
        raise PhotoswapInputError("region_mask", "finite mask values (found NaN or Inf)", "check the mask's source")
    resized = torch.nn.functional.interpolate(mask[None].float().cpu(), size=tuple(latent_hw), mode="area")
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
         callback=None, region_mask=None) -> SwapResult:
    """The target pass. `region_mask`: an explicit region (a MASK) outside which the result is the source."""
    arch = check_trace(model, trace)
    arch.prompt_entry(model, target_positive, "target_positive")
    arch.prompt_entry(model, negative, "negative")
    arch.check_guidance(None, cfg)
    mode = choose_mode(trace, windows, cfg, lockstep)
    region = region_at_latent(region_mask, trace.latent_shape[-2:])
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
                  region_mask=None if region is None else region.to(device))
    start = plan.trajectory_k[0]
    try:
        out = sample(patch_model(model, run), run, plan, arch.to_latent(start.cpu()), trace.schedule.sigmas,
                     target_positive, negative, cfg, callback)
    finally:
        if source_store is not None:
            source_store.release_staged()
    final_scale = plan.scales[-1]
    target = out[-1:] / final_scale
    # the same arithmetic as the target row's path (sampler space → LATENT, then the sampler-space factor), so equal
    # rows give equal outputs
    source = arch.to_latent(plan.trajectory_k[-1].to(out.device)) / final_scale
    return SwapResult(target, source, plan.last_mask, mode, run.masks.pair_masks)


def swap_images(model, trace: SourceTrace, target_positive, negative, prompts, windows, cfg, lockstep=False,
                callback=None, region_mask=None):
    """The Swap Sampler's stage: (swapped LATENT, source LATENT, combined MASK, per-pair MASK batch), masks at image
    size; all ones where no mask was used."""
    result = swap(model, trace, target_positive, negative, prompts, windows, cfg, lockstep, callback, region_mask)
    h, w = result.target.shape[-2:]
    pairs = max(1, len(getattr(prompts, "subjects", ()) or ()))
    mask = result.mask if result.mask is not None else torch.ones(1, 1, h, w)
    pair_masks = result.pair_masks if result.pair_masks is not None else torch.ones(pairs, 1, h, w)

    def at_image_size(m):
        return torch.nn.functional.interpolate(m.float().cpu(), scale_factor=trace.arch.latent.downscale,
                                               mode="nearest")[:, 0]

    return ({"samples": result.target.cpu()}, {"samples": result.source.cpu()}, at_image_size(mask),
            at_image_size(pair_masks))
