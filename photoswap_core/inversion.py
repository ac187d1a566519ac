"""Real image → z_T plus everything the source pass needs to reproduce it (DESIGN.md §2, "Inversion").

Methods:
- `null_text`: DDIM inversion (guidance 1), then per-step null-embedding optimisation (Mokady et al.), as the
  official Photoswap code runs it. Only the embedding gets gradients; optimisation in float32.
- `direct`: DDIM inversion only; the source trajectory is the inversion latents themselves (pinned), null = "".
- `negative_prompt`: null embedding := source prompt embedding at every step (no optimisation).
- `ddim`: plain DDIM inversion with the "" null, for comparison.
All latents here are model-space latents (for the SD family the VP latent, VAE latent × scale factor), float32, on
the model's device; the steps are the architecture adapter's (`arch.move`).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from . import frames
from .arch import Schedule, inspect_model
from .errors import PhotoswapInputError
from .evaluator import DirectEvaluator

METHODS = ("null_text", "direct", "negative_prompt", "ddim")  # the node's choice list
SOLVERS = ("euler", "midpoint")  # the node's choice list: the inversion's ODE step (the SD family: DDIM = "euler")


@dataclass
class InversionSettings:
    method: str = "null_text"
    steps: int = 50
    cfg: float = 7.5
    inner_iterations: int = 10
    early_stop_epsilon: float = 1e-5
    learning_rate: float = 1e-2
    solver: str = "euler"


@dataclass
class InversionOutput:
    inversion_latents: list  # N+1 model-space latents: index 0 = image latent, N = z_T
    trajectory: list  # N+1 model-space latents the source row takes: index i = latent entering step i, N = reconstruction
    null_embeddings: torch.Tensor  # [N, 1, 77, C] float32 (CPU)
    inner_iterations: list = field(default_factory=list)  # null_text: iterations run per step
    losses: list = field(default_factory=list)  # null_text: pre-update loss of every iteration, per step


def _check_interrupt():
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


@torch.no_grad()
def ddim_invert(evaluator: DirectEvaluator, schedule: Schedule, image_latent, cond_kwargs, progress=None):
    """DDIM inversion, cond only, no guidance: step i evaluates ε at the destination timestep on the current latent."""
    n = schedule.steps
    latents = [image_latent]
    x = image_latent.clone()
    for i in range(n):
        _check_interrupt()
        src, dst = n - i, n - 1 - i  # sigma indices: σ(0) → σ(t_{N-1}) = σ(1) → … → σ(t_0)
        sigma_dst = float(schedule.sigmas[dst])
        eps = evaluator.eps(x, sigma_dst, **cond_kwargs)
        x = evaluator.arch.move(x, eps, float(schedule.sigmas[src]), sigma_dst)
        latents.append(x)
        if progress:
            progress(x.shape[0])  # one unit per frame and step
    return latents


@contextmanager
def grad_capable(evaluator: DirectEvaluator):
    """Let autograd flow through the UNet to the context without weight gradients.

    Inside ComfyUI's server every weight is an inference tensor, which autograd refuses to save for backward. Such
    weights are replaced, one tensor at a time, by normal tensors with the same values, dtype and device (ComfyUI
    itself replaces parameters this way when it patches weights), so memory grows by one tensor, not by a second copy
    of the model (cloning the whole UNet doubled the weights' memory: the server was OOM-killed on a 23 GB machine
    with SD1.5 in fp32). The replacement stays: values are unchanged and later runs need no copies.
    """
    with torch.inference_mode(False), torch.enable_grad():
        _replace_inference_tensors(evaluator.base.diffusion_model)
        yield


def _replace_inference_tensors(module: torch.nn.Module) -> None:
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.is_inference():
                sub._parameters[name] = torch.nn.Parameter(_as_normal(param), requires_grad=False)
        for name, buf in list(sub._buffers.items()):
            if buf is not None:
                sub._buffers[name] = _as_normal(buf)


def _as_normal(t: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode(False):
        return t.clone() if t.is_inference() else t


REFERENCE_STEPS = 50  # the official notebook's step count; its per-step schedules scale with N / 50 elsewhere


def early_stop_threshold(epsilon: float, step: int, steps: int) -> float:
    """The reference's null-text early stop at step i of N: ε + 2e-5·i (at N = 50), i scaled by 50/N."""
    return epsilon + 2e-5 * step * REFERENCE_STEPS / steps


def null_text_optimization(evaluator, schedule, inversion_latents, cond_kwargs, null_start, settings,
                           progress=None, max_steps=None, uncond_y=None):
    """Per-step null-embedding optimisation (reference semantics at N = 50, fractions scale with N otherwise).

    For i = 0…N-1: warm start from step i-1's kept embedding (step 0 from ""), a fresh Adam with lr·(1 − i/(2N)),
    up to `inner_iterations` of: uncond ε with grad → CFG → DDIM step → MSE to the inversion latent one step lower →
    Adam step; stop when the pre-update loss < ε_stop + 2e-5·i·50/N. Then advance the source latent by one CFG step
    with the kept (post-update) embedding; that sequence is the source trajectory.
    `max_steps`: optimise only steps 0 … max_steps-1 (the lr/threshold schedules still use N); for affordable tests.
    `uncond_y`: SDXL's ADM vector for the unconditional branch (the negative's pooled output, as ComfyUI's sampler and
    the swap use it); None = the source's. Only the token embedding is optimised; the pooled part stays as given.
    """
    n = schedule.steps
    guidance = settings.cfg
    move = evaluator.arch.move
    y = cond_kwargs.get("y")
    y = None if y is None else _as_normal(y)
    y_u = y if uncond_y is None else _as_normal(uncond_y)
    cond_ctx = _as_normal(cond_kwargs["c_crossattn"])
    embedding = _as_normal(null_start).float()
    x = _as_normal(inversion_latents[-1])
    trajectory = [x.detach().clone()]
    kept, iterations, losses = [], [], []
    with grad_capable(evaluator):
        for i in range(n if max_steps is None else min(n, max_steps)):
            sigma, sigma_next = float(schedule.sigmas[i]), float(schedule.sigmas[i + 1])
            target = _as_normal(inversion_latents[n - i - 1])
            embedding = embedding.detach().clone().requires_grad_(True)
            optimizer = torch.optim.Adam([embedding], lr=settings.learning_rate * (1.0 - i / (2.0 * n)))
            with torch.no_grad():
                eps_cond = evaluator.eps(x, sigma, cond_ctx, y)
            threshold = early_stop_threshold(settings.early_stop_epsilon, i, n)
            step_losses = []
            for _ in range(settings.inner_iterations):
                _check_interrupt()
                eps_uncond = evaluator.eps(x, sigma, embedding, y_u)
                eps = eps_uncond + guidance * (eps_cond - eps_uncond)
                prev = move(x, eps, sigma, sigma_next)
                loss = torch.nn.functional.mse_loss(prev, target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_value = loss.item()
                step_losses.append(loss_value)
                if progress:
                    progress(1)
                if loss_value < threshold:
                    break
            if progress and len(step_losses) < settings.inner_iterations:
                progress(settings.inner_iterations - len(step_losses))
            iterations.append(len(step_losses))
            losses.append(step_losses)
            kept.append(embedding.detach().clone())
            with torch.no_grad():
                eps_uncond = evaluator.eps(x, sigma, kept[-1], y_u)
                x = move(x, eps_uncond + guidance * (eps_cond - eps_uncond), sigma, sigma_next)
            trajectory.append(x.detach().clone())
    return kept, trajectory, iterations, losses


@torch.no_grad()
def cfg_trajectory(evaluator, schedule, z_t, cond_kwargs, null_embeddings, guidance, progress=None, uncond_y=None):
    """The source pass from z_T with CFG and per-step null embeddings (used for `negative_prompt` and `ddim`)."""
    y = cond_kwargs.get("y")
    y_u = y if uncond_y is None else uncond_y
    x = z_t
    trajectory = [x]
    for i in range(schedule.steps):
        _check_interrupt()
        sigma = float(schedule.sigmas[i])
        eps_c = evaluator.eps(x, sigma, cond_kwargs["c_crossattn"], y)
        eps_u = evaluator.eps(x, sigma, null_embeddings[i], y_u)
        x = evaluator.arch.move(x, eps_u + guidance * (eps_c - eps_u), sigma, float(schedule.sigmas[i + 1]))
        trajectory.append(x)
        if progress:
            progress(x.shape[0])
    return trajectory


def _null_text_frames(evaluator, schedule, inversion_latents, cond_kwargs, null_ctx, settings, progress, uncond_y,
                      out):
    """Null-text optimisation frame by frame (each frame its own per-step null embeddings and early stops, exactly
    as a single image): returns (nulls [N, F, T, C], trajectory of [F, …] latents)."""
    frames = inversion_latents[0].shape[0]
    runs = []
    for f in range(frames):
        latents = inversion_latents if frames == 1 else [x[f:f + 1] for x in inversion_latents]
        runs.append(null_text_optimization(evaluator, schedule, latents, cond_kwargs, null_ctx, settings, progress,
                                           uncond_y=uncond_y))
    for _, _, iterations, losses in runs:
        out.inner_iterations.extend(iterations)
        out.losses.extend(losses)
    if frames == 1:
        kept, trajectory = runs[0][0], runs[0][1]
        return torch.stack([k.float() for k in kept]), trajectory
    nulls = torch.stack([torch.cat([r[0][i].float() for r in runs]) for i in range(len(runs[0][0]))])
    trajectory = [torch.cat([r[1][i] for r in runs]) for i in range(len(runs[0][1]))]
    return nulls, trajectory


def progress_total(settings: InversionSettings, frames: int = 1) -> int:
    """Units of work for a ProgressBar: model evaluations of the inversion plus the source pass/optimisation (the
    units count frames × steps: a clip of F frames is F times the work of one image)."""
    n = settings.steps
    if settings.method == "null_text":
        return frames * (n + n * settings.inner_iterations)
    if settings.method == "direct":
        return frames * n * (2 if settings.solver == "midpoint" else 1)
    return frames * 2 * n


def invert(model, schedule: Schedule, image_latent_vp, source_entry, null_entry, settings: InversionSettings,
           progress=None) -> InversionOutput:
    """Run one inversion. `source_entry` / `null_entry` are single CONDITIONING entries (tensor, options)."""
    if settings.method not in METHODS:
        raise PhotoswapInputError("method", f"one of {', '.join(METHODS)} (got {settings.method!r})",
                                  "pick a listed method")
    evaluator = DirectEvaluator(model, image_latent_vp.shape)
    device = evaluator.device
    x0 = image_latent_vp.to(device, torch.float32)
    cond_kwargs = evaluator.model_kwargs(source_entry)
    null_kwargs = evaluator.model_kwargs(null_entry)
    null_ctx = null_kwargs["c_crossattn"]
    uncond_y = null_kwargs.get("y")  # SDXL: the uncond branch keeps the negative's pooled/ADM, as in ComfyUI's CFG
    inversion_latents = ddim_invert(evaluator, schedule, x0, cond_kwargs, progress)
    n = schedule.steps
    out = InversionOutput(inversion_latents=inversion_latents, trajectory=[], null_embeddings=None)
    if settings.method == "null_text":
        nulls, out.trajectory = _null_text_frames(evaluator, schedule, inversion_latents, cond_kwargs, null_ctx,
                                                  settings, progress, uncond_y, out)
    elif settings.method == "direct":
        nulls = null_ctx.float().unsqueeze(0).expand(n, *null_ctx.shape).clone()
        out.trajectory = list(reversed(inversion_latents))
    else:
        ctx = cond_kwargs["c_crossattn"] if settings.method == "negative_prompt" else null_ctx
        nulls = ctx.float().unsqueeze(0).expand(n, *ctx.shape).clone()
        out.trajectory = cfg_trajectory(evaluator, schedule, inversion_latents[-1], cond_kwargs, nulls,
                                        settings.cfg, progress, uncond_y=uncond_y)
    out.null_embeddings = nulls.detach().to("cpu")
    out.inversion_latents = [t.detach() for t in out.inversion_latents]
    out.trajectory = [t.detach() for t in out.trajectory]
    return out


@dataclass
class InversionResult:
    """PHOTOSWAP_INVERSION: everything a source pass needs to reproduce the inverted image."""
    schedule: Schedule
    arch: object  # arch.Architecture of the model it was made with
    settings: InversionSettings
    latent_shape: tuple  # (1, 4, h, w)
    trajectory: list  # N+1 model-space latents (CPU float32); trajectory[0] = z_T, trajectory[N] = reconstruction
    inversion_latents: list  # N+1 model-space latents of the DDIM inversion (index 0 = image latent, N = z_T)
    null_embeddings: torch.Tensor  # [N, 1, T, C] float32 CPU
    source_conditioning: list  # the CONDITIONING the inversion was made with
    negative_conditioning: list
    weights_fingerprint: str
    latent_fingerprint: str
    inner_iterations: list = field(default_factory=list)
    recording: object = None  # recorder.InversionRecording: the source pass recorded on the way (flow models)

    @property
    def z_t(self) -> torch.Tensor:
        return self.trajectory[0]

    def __deepcopy__(self, memo):  # immutable once built
        return self


def latent_fingerprint(latent: torch.Tensor) -> str:
    import hashlib

    data = latent.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def validate_settings(settings: InversionSettings) -> None:
    if settings.method not in METHODS:
        raise PhotoswapInputError("method", f"one of {', '.join(METHODS)} (got {settings.method!r})",
                                  "pick a listed method")
    if settings.cfg <= 0:
        raise PhotoswapInputError("cfg", f"a guidance scale > 0 (got {settings.cfg})", "use 7.5 (the paper's value)")
    if settings.solver not in SOLVERS:
        raise PhotoswapInputError("solver", f"one of {', '.join(SOLVERS)} (got {settings.solver!r})",
                                  "pick a listed solver")
    if settings.method != "null_text":
        return
    if not settings.learning_rate > 0:
        raise PhotoswapInputError("learning_rate", f"a learning rate > 0 (got {settings.learning_rate})",
                                  "use 0.01 (the reference's value)")
    if settings.cfg == 1.0:
        raise PhotoswapInputError(
            "cfg", "cfg > 1 for null-text inversion (the optimised null embedding acts only through the "
                   "unconditional branch, which is skipped at cfg 1)", "use 7.5, or method 'direct'")
    if settings.inner_iterations < 1:
        raise PhotoswapInputError("inner_iterations", "at least 1", "use 10 (the reference's value)")


def _concat(outputs: list) -> InversionOutput:
    """The inversion of a clip from those of its chunks of frames (frames are independent: each its own run)."""
    if len(outputs) == 1:
        return outputs[0]
    nulls = [o.null_embeddings for o in outputs]
    shared = all(nl.shape[1] == 1 and torch.equal(nl, nulls[0]) for nl in nulls)
    out = InversionOutput(
        inversion_latents=[torch.cat(xs) for xs in zip(*(o.inversion_latents for o in outputs))],
        trajectory=[torch.cat(xs) for xs in zip(*(o.trajectory for o in outputs))],
        null_embeddings=nulls[0] if shared else torch.cat(nulls, dim=1))
    for o in outputs:
        out.inner_iterations.extend(o.inner_iterations)
        out.losses.extend(o.losses)
    return out


def run_inversion(model, latent_samples, source_positive, negative, settings: InversionSettings,
                  progress=None, frames_per_batch: int = 0) -> InversionResult:
    """Validate inputs and invert a LATENT (unscaled VAE latent; a batch of F frames is a clip, each frame its own
    inversion, `frames_per_batch` at a time) into an InversionResult."""
    arch = inspect_model(model)
    arch.check_latent(latent_samples, "latent")
    arch.check_guidance(settings.method, settings.cfg)
    validate_settings(settings)
    arch.check_solver(settings.solver)
    src_entry = arch.prompt_entry(model, source_positive, "source_positive")
    neg_entry = arch.prompt_entry(model, negative, "negative")
    schedule = arch.schedule(model, settings.steps)
    image = arch.to_model_space(latent_samples)
    recording = None
    if arch.inverts_as_a_sampler_pass:
        from .recorder import invert_flow

        latents, nulls, recording = invert_flow(model, source_positive, negative, schedule, image, settings.cfg,
                                                settings.solver, progress)
        out = InversionOutput(inversion_latents=latents, trajectory=list(reversed(latents)), null_embeddings=nulls)
    else:
        parts = frames.plan(model, image.shape[0], image.shape, frames_per_batch, rows_per_frame=1)
        out = _concat([invert(model, schedule, image[c.frames[0]:c.frames[-1] + 1], src_entry, neg_entry, settings,
                              progress) for c in parts])
    return InversionResult(
        schedule=schedule, arch=arch, settings=settings, latent_shape=tuple(latent_samples.shape),
        trajectory=[t.float().cpu() for t in out.trajectory],
        inversion_latents=[t.float().cpu() for t in out.inversion_latents],
        null_embeddings=out.null_embeddings, source_conditioning=source_positive, negative_conditioning=negative,
        weights_fingerprint=arch.weights_fingerprint(model), latent_fingerprint=latent_fingerprint(latent_samples),
        inner_iterations=list(out.inner_iterations), recording=recording)


def invert_latent(model, latent, source_positive, negative, settings: InversionSettings, vae=None, progress=None,
                  frames_per_batch: int = 0):
    """The inversion node's stage: (result, z_T LATENT, sigmas, decoded reconstruction or None, summary text)."""
    if not isinstance(latent, dict) or "samples" not in latent:
        raise PhotoswapInputError("latent", "a LATENT (from VAE Encode)", "connect VAE Encode's output")
    samples = latent["samples"]
    result = run_inversion(model, samples, source_positive, negative, settings, progress, frames_per_batch)
    text = summary(result, result.arch.to_model_space(samples.cpu()))
    image = None
    if vae is not None:
        image = vae.decode(result.arch.to_latent(result.trajectory[-1].float()))
        if image.dim() == 5:  # video VAEs return [B, T, H, W, C]
            image = image.reshape(-1, *image.shape[-3:])
    return result, z_t_latent(result), result.schedule.sigmas.clone(), image, text


def z_t_latent(result: InversionResult) -> dict:
    """The LATENT a stock sampler (noise off, first sigma σ_0 = sigmas[0]) starts from to continue at z_T."""
    return {"samples": result.arch.stock_start_latent(result.z_t, float(result.schedule.sigmas[0]))}


def summary(result: InversionResult, image_latent=None) -> str:
    """What the inversion node shows: method, size, reconstruction error, inner iterations."""
    s = result.settings
    lines = [f"method {s.method}, {result.schedule.steps} steps, cfg {s.cfg:g}, model {result.arch.config_name} "
             f"({result.arch.prediction}), latent {result.latent_shape[-2]}×{result.latent_shape[-1]}"]
    if image_latent is not None:
        diff = (result.trajectory[-1].float() - image_latent.float().cpu())
        lines.append(f"reconstruction error ({result.arch.latent.space}): max |Δ| {float(diff.abs().max()):.3e}, "
                     f"MSE {float(diff.pow(2).mean()):.3e}")
    if result.inner_iterations:
        early = sum(1 for k in result.inner_iterations if k < s.inner_iterations)
        lines.append(f"inner iterations per step: {list(result.inner_iterations)} ({early} of "
                     f"{len(result.inner_iterations)} steps stopped early)")
    return "\n".join(lines)
