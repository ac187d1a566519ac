"""The sampler both passes run through ComfyUI's own machinery: `comfy.sample.sample_custom` with a KSAMPLER whose
function is deterministic DDIM (Euler over the schedule's sigmas, in sampler space) plus the Photoswap between-step
rules:
- the source row is pinned to the source trajectory; the per-step correction that pins it (trajectory[i+1] minus the
  source's own step) is added to the target row too (as target = trajectory[i+1] + (target step − source step)) —
  float noise for `null_text`, and for `direct` the Direct Inversion rule (Ju et al. 2023), so identical prompts give
  the source reconstruction exactly for every method;
- LocalBlend after each step from its start fraction on.
The CFG guider, ControlNet, model patches (LoRA, other packs' patches) and previews work as in any ComfyUI sampler.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention_patch import RunMode, SwapRun


@dataclass
class SamplingPlan:
    """What one sampling run starts from and what it hands back (sampler-space latents on the compute device)."""
    scales: list  # host floats: sampler-space = scale · model-space latent, per sigma
    trajectory_k: list | None = None  # the source trajectory (a real image), or None (a synthetic source)
    start_k: torch.Tensor | None = None  # synthetic source: the start latent
    source_steps: list | None = None  # target pass from a recorded trace: the source's own step results
    step_recorder: object | None = None  # target pass in lockstep: a TraceRecorder for one step at a time
    source_steps_out: list = field(default_factory=list)  # record pass: the source's own step results
    generated_vp: list = field(default_factory=list)  # synthetic record pass: the source latents, model space
    last_mask: torch.Tensor | None = None  # target pass: the last mask LocalBlend and the regions used


def _euler(x, denoised, sigma, sigma_next):
    return x + (x - denoised) / sigma * (sigma_next - sigma)


def _record_step(model, x, i, sigmas, s_in, extra_args, plan: SamplingPlan):
    """The source row's step i. A synthetic source continues from exactly what the trace stores (model space
    float32, re-scaled), so recorded tensors, source steps and trajectory agree bit for bit (trace ≡ lockstep)."""
    traj = plan.trajectory_k
    if traj is not None:
        x = traj[i].clone()
    denoised = model(x, sigmas[i] * s_in, **extra_args)
    x_next = _euler(x, denoised, sigmas[i], sigmas[i + 1])
    plan.source_steps_out.append(x_next.clone())
    if traj is not None:
        return traj[i + 1].clone(), denoised
    scale_next = plan.scales[i + 1]  # host floats: float(sigma_next) would read the device
    x_vp = (x_next / scale_next).float()
    plan.generated_vp.append(x_vp.clone())
    return x_vp * scale_next, denoised


def _target_step(model, x, i, sigmas, s_in, extra_args, run: SwapRun, plan: SamplingPlan):
    """The target row's step i; in lockstep a record call on the source row comes first (one step's tensors)."""
    traj = plan.trajectory_k
    run.prefetch(i, x.device)
    if plan.step_recorder is not None:
        plan.step_recorder.begin_step()
        run.mode = RunMode.RECORD
        try:
            src_denoised = model(traj[i], sigmas[i] * s_in, **extra_args)
        finally:
            run.mode = RunMode.TARGET
        source_step = _euler(traj[i], src_denoised, sigmas[i], sigmas[i + 1])
    else:
        source_step = plan.source_steps[i]
    run.begin_step(i, tuple(x.shape[-2:]))
    denoised = model(x, sigmas[i] * s_in, **extra_args)
    x_next = _euler(x, denoised, sigmas[i], sigmas[i + 1])
    source = traj[i + 1]
    target = source + (x_next - source_step)  # exact when both rows computed the same step
    x_next, mask = run.end_step(i, source, target)
    if mask is not None:
        plan.last_mask = mask
    return x_next, denoised


def photoswap_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, run=None, plan=None):
    """KSAMPLER function: one row (x), the source (record mode) or the target (target mode)."""
    import comfy.model_management

    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    if plan.trajectory_k is not None:  # start exactly at z_T (the LATENT round trip through the scale factor rounds)
        x = plan.trajectory_k[0].clone()
    elif plan.start_k is not None:  # synthetic source: start exactly at the stored trajectory[0]
        x = plan.start_k.clone()
    for i in range(len(sigmas) - 1):
        comfy.model_management.throw_exception_if_processing_interrupted()
        run.step = i
        if run.mode is RunMode.RECORD:
            x, denoised = _record_step(model, x, i, sigmas, s_in, extra_args, plan)
        else:
            x, denoised = _target_step(model, x, i, sigmas, s_in, extra_args, run, plan)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
    return x


def sample(patched, run: SwapRun, plan: SamplingPlan, latent, sigmas, positive, negative, cfg, callback=None):
    """One run of `photoswap_sampler` through `comfy.sample.sample_custom` on the patched clone (noise off)."""
    import comfy.sample
    import comfy.samplers

    sampler = comfy.samplers.KSAMPLER(photoswap_sampler, extra_options={"run": run, "plan": plan})
    noise = torch.zeros_like(latent)
    return comfy.sample.sample_custom(patched, noise, cfg, sampler, sigmas.clone(), positive, negative, latent,
                                      callback=callback, disable_pbar=True)
