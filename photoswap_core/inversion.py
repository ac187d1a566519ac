"""Real image → z_T plus everything the source pass needs to reproduce it (DESIGN.md §2, "Inversion").

Methods:
- `null_text`: DDIM inversion (guidance 1), then per-step null-embedding optimisation (Mokady et al.), as the
  official Photoswap code runs it. Only the embedding gets gradients; optimisation in float32.
- `direct`: DDIM inversion only; the source trajectory is the inversion latents themselves (pinned), null = "".
- `negative_prompt`: null embedding := source prompt embedding at every step (no optimisation).
- `ddim`: plain DDIM inversion with the "" null, for comparison.
All latents here are VP latents (VAE latent × scale factor), float32, on the model's device.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .errors import PhotoswapInputError
from .model_adapter import DirectEvaluator
from .schedule import DDIMSchedule

METHODS = ("null_text", "direct", "negative_prompt", "ddim")


@dataclass
class InversionSettings:
    method: str = "null_text"
    steps: int = 50
    cfg: float = 7.5
    inner_iterations: int = 10
    early_stop_epsilon: float = 1e-5
    learning_rate: float = 1e-2


@dataclass
class InversionOutput:
    inversion_latents: list  # N+1 VP latents: index 0 = image latent, N = z_T
    trajectory: list  # N+1 VP latents the source row takes: index i = latent entering step i, N = reconstruction
    null_embeddings: torch.Tensor  # [N, 1, 77, C] float32 (CPU)
    inner_iterations: list = field(default_factory=list)  # null_text: iterations run per step
    losses: list = field(default_factory=list)  # null_text: pre-update loss of every iteration, per step


def _check_interrupt():
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


def ddim_step(x_vp, eps, alpha_from: float, alpha_to: float):
    """Deterministic DDIM move of x from ᾱ_from to ᾱ_to with noise estimate eps (either direction)."""
    x0 = (x_vp - math.sqrt(1.0 - alpha_from) * eps) / math.sqrt(alpha_from)
    return math.sqrt(alpha_to) * x0 + math.sqrt(1.0 - alpha_to) * eps


@torch.no_grad()
def ddim_invert(evaluator: DirectEvaluator, schedule: DDIMSchedule, image_latent, cond_kwargs, progress=None):
    """DDIM inversion, cond only, no guidance: step i evaluates ε at the destination timestep on the current latent."""
    n = schedule.steps
    latents = [image_latent]
    x = image_latent.clone()
    for i in range(n):
        _check_interrupt()
        src, dst = n - i, n - 1 - i  # sigma indices: σ(0) → σ(t_{N-1}) = σ(1) → … → σ(t_0)
        eps = evaluator.eps(x, float(schedule.sigmas[dst]), **cond_kwargs)
        x = ddim_step(x, eps, schedule.alpha_bar(src), schedule.alpha_bar(dst))
        latents.append(x)
        if progress:
            progress(1)
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
            sigma = float(schedule.sigmas[i])
            a_cur, a_next = schedule.alpha_bar(i), schedule.alpha_bar(i + 1)
            target = _as_normal(inversion_latents[n - i - 1])
            embedding = embedding.detach().clone().requires_grad_(True)
            optimizer = torch.optim.Adam([embedding], lr=settings.learning_rate * (1.0 - i / (2.0 * n)))
            with torch.no_grad():
                eps_cond = evaluator.eps(x, sigma, cond_ctx, y)
            threshold = settings.early_stop_epsilon + 2e-5 * i * 50.0 / n
            step_losses = []
            for _ in range(settings.inner_iterations):
                _check_interrupt()
                eps_uncond = evaluator.eps(x, sigma, embedding, y_u)
                eps = eps_uncond + guidance * (eps_cond - eps_uncond)
                prev = ddim_step(x, eps, a_cur, a_next)
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
                x = ddim_step(x, eps_uncond + guidance * (eps_cond - eps_uncond), a_cur, a_next)
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
        x = ddim_step(x, eps_u + guidance * (eps_c - eps_u), schedule.alpha_bar(i), schedule.alpha_bar(i + 1))
        trajectory.append(x)
        if progress:
            progress(1)
    return trajectory


def progress_total(settings: InversionSettings) -> int:
    """Units of work for a ProgressBar: model evaluations of the inversion plus the source pass/optimisation."""
    n = settings.steps
    if settings.method == "null_text":
        return n + n * settings.inner_iterations
    if settings.method == "direct":
        return n
    return 2 * n


def invert(model, schedule: DDIMSchedule, image_latent_vp, source_entry, null_entry, settings: InversionSettings,
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
        kept, trajectory, out.inner_iterations, out.losses = null_text_optimization(
            evaluator, schedule, inversion_latents, cond_kwargs, null_ctx, settings, progress, uncond_y=uncond_y)
        nulls = torch.stack([k.float() for k in kept])
        out.trajectory = trajectory
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
    schedule: DDIMSchedule
    model_info: object  # model_adapter.ModelInfo
    settings: InversionSettings
    latent_shape: tuple  # (1, 4, h, w)
    trajectory: list  # N+1 VP latents (CPU float32); trajectory[0] = z_T, trajectory[N] = reconstruction
    inversion_latents: list  # N+1 VP latents of the DDIM inversion (index 0 = image latent, N = z_T)
    null_embeddings: torch.Tensor  # [N, 1, 77, C] float32 CPU
    source_conditioning: list  # the CONDITIONING the inversion was made with
    negative_conditioning: list
    weights_fingerprint: str
    latent_fingerprint: str
    inner_iterations: list = field(default_factory=list)

    @property
    def z_t(self) -> torch.Tensor:
        return self.trajectory[0]

    def __deepcopy__(self, memo):  # immutable once built
        return self


def latent_fingerprint(latent: torch.Tensor) -> str:
    import hashlib

    data = latent.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def run_inversion(model, latent_samples, source_positive, negative, settings: InversionSettings,
                  progress=None) -> InversionResult:
    """Validate inputs and invert a LATENT (unscaled VAE latent, batch 1) into an InversionResult."""
    from .model_adapter import inspect_model
    from .schedule import build_schedule
    from .swap_sampler import check_latent, model_prompt, weights_fingerprint

    info = inspect_model(model)
    check_latent(latent_samples, "latent")
    if settings.cfg <= 0:
        raise PhotoswapInputError("cfg", f"a guidance scale > 0 (got {settings.cfg})", "use 7.5 (the paper's value)")
    if settings.method == "null_text" and settings.cfg == 1.0:
        raise PhotoswapInputError(
            "cfg", "cfg > 1 for null-text inversion (the optimised null embedding acts only through the "
                   "unconditional branch, which is skipped at cfg 1)", "use 7.5, or method 'direct'")
    if settings.method == "null_text" and settings.inner_iterations < 1:
        raise PhotoswapInputError("inner_iterations", "at least 1", "use 10 (the reference's value)")
    src_entry = model_prompt(model, source_positive, "source_positive")
    neg_entry = model_prompt(model, negative, "negative")
    schedule = build_schedule(model.get_model_object("model_sampling"), settings.steps)
    image_vp = latent_samples.float() * info.latent_scale
    out = invert(model, schedule, image_vp, src_entry, neg_entry, settings, progress)
    return InversionResult(
        schedule=schedule, model_info=info, settings=settings, latent_shape=tuple(latent_samples.shape),
        trajectory=[t.float().cpu() for t in out.trajectory],
        inversion_latents=[t.float().cpu() for t in out.inversion_latents],
        null_embeddings=out.null_embeddings, source_conditioning=source_positive, negative_conditioning=negative,
        weights_fingerprint=weights_fingerprint(model), latent_fingerprint=latent_fingerprint(latent_samples),
        inner_iterations=list(out.inner_iterations))
