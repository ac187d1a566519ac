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
    image_k: torch.Tensor | None = None  # flow inversion: the image latent it starts from
    solver: str = "euler"  # flow inversion: the ODE step ("euler" / "midpoint")
    inversion_out: list = field(default_factory=list)  # flow inversion: image latent … z_T (N+1, sampler space)
    progress: object | None = None  # flow inversion: called with 1 per model evaluation


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


def _velocity(model, x, sigma, s_in, extra_args):
    """(v, denoised) of a flow model (CONST: denoised = x − σ·v) at σ > 0."""
    denoised = model(x, sigma * s_in, **extra_args)
    return (x - denoised) / sigma, denoised


def flow_inversion_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, run=None, plan=None):
    """KSAMPLER function of the flow-ODE inversion (flow models: sampler space = model space), recording the source
    pass on the way.

    The schedule σ_0 = 1 > … > σ_N = 0 is walked backwards from the image. Each step from σ_a to σ_b (a = N − k)
    evaluates the velocity at its current point (x_k, σ_a): exactly the source row's evaluation of swap step a
    (trajectory[a] = x_k), so that call runs in RECORD mode with `run.step = a` and its tensors, LocalBlend map
    and source step are the ones the Recorder would compute there (steps 1 … N−1; the Recorder adds step 0, at z_T).
    At σ = 0 ComfyUI's CONST `apply_model` cannot return v (it returns x − 0·v), so the first step evaluates at its
    destination σ (Euler) or its midpoint σ (midpoint's first stage). "midpoint" (RF-Solver's second-order step):
    x_m = x + (σ_m − σ_a)·v(x, σ_a), x_b = x + (σ_b − σ_a)·v(x_m, σ_m), σ_m = (σ_a + σ_b)/2; those extra calls run
    in PLAIN mode (nothing recorded)."""
    import comfy.model_management

    extra_args = extra_args or {}
    sig = [float(s) for s in sigmas]
    n = len(sig) - 1
    x = plan.image_k.clone()
    s_in = x.new_ones([x.shape[0]])
    plan.source_steps_out = [None] * n
    plan.inversion_out = [x.clone()]

    def evaluate(x_at, sigma, step=None):
        comfy.model_management.throw_exception_if_processing_interrupted()
        run.mode = RunMode.PLAIN if step is None else RunMode.RECORD
        if step is not None:
            run.step = step
        try:
            v, denoised = _velocity(model, x_at, sigmas[step] if step is not None else sigma, s_in, extra_args)
        finally:
            run.mode = RunMode.RECORD
        if plan.progress is not None:
            plan.progress(1)
        return v, denoised

    for k in range(n):
        a, b = n - k, n - 1 - k
        sa, sb = sig[a], sig[b]
        sm = 0.5 * (sa + sb)
        if a == n:  # σ_a = 0: no velocity through apply_model
            v, _ = evaluate(x, sigmas[b] if plan.solver == "euler" else x.new_tensor(sm))
        else:
            v, denoised = evaluate(x, None, step=a)
            plan.source_steps_out[a] = _euler(x, denoised, sigmas[a], sigmas[a + 1])
        if plan.solver == "midpoint":
            v, _ = evaluate(x + (sm - sa) * v, x.new_tensor(sm))
        x = x + (sb - sa) * v
        plan.inversion_out.append(x.clone())
        if callback is not None:
            callback({"x": x, "i": k, "sigma": sigmas[b], "sigma_hat": sigmas[b], "denoised": x})
    return x


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


def sample(patched, run: SwapRun, plan: SamplingPlan, latent, sigmas, positive, negative, cfg, callback=None,
           function=photoswap_sampler):
    """One run of `function` (`photoswap_sampler`, or `flow_inversion_sampler`) through
    `comfy.sample.sample_custom` on the patched clone (noise off)."""
    import comfy.sample
    import comfy.samplers

    sampler = comfy.samplers.KSAMPLER(function, extra_options={"run": run, "plan": plan})
    noise = torch.zeros_like(latent)
    return comfy.sample.sample_custom(patched, noise, cfg, sampler, sigmas.clone(), positive, negative, latent,
                                      callback=callback, disable_pbar=True)
