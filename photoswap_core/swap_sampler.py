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
    mask: torch.Tensor | None  # the last LocalBlend mask [1, 1, h, w] (latent size), None when it never ran
    mode: SwapMode


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
    if abs(cfg - trace.cfg) > 1e-9:
        log.warning("Photoswap: cfg %.2f differs from the trace's %.2f; running lockstep", cfg, trace.cfg)
        return SwapMode.LOCKSTEP
    return SwapMode.TRACE


def swap(model, trace: SourceTrace, target_positive, negative, prompts, windows, cfg, lockstep=False,
         callback=None) -> SwapResult:
    """The target pass."""
    arch = check_trace(model, trace)
    arch.prompt_entry(model, target_positive, "target_positive")
    arch.prompt_entry(model, negative, "negative")
    mode = choose_mode(trace, windows, cfg, lockstep)
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
                  recorder=plan.step_recorder, device=device)
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
    return SwapResult(target, source, plan.last_mask, mode)


def swap_images(model, trace: SourceTrace, target_positive, negative, prompts, windows, cfg, lockstep=False,
                callback=None):
    """The Swap Sampler's stage: (swapped LATENT, source LATENT, blend MASK at image size; all ones without
    LocalBlend)."""
    result = swap(model, trace, target_positive, negative, prompts, windows, cfg, lockstep, callback)
    mask = result.mask
    h, w = result.target.shape[-2:]
    if mask is None:
        mask = torch.ones(1, 1, h, w)
    mask = torch.nn.functional.interpolate(mask.float().cpu(), scale_factor=trace.arch.latent.downscale,
                                           mode="nearest")[:, 0]
    return {"samples": result.target.cpu()}, {"samples": result.source.cpu()}, mask
