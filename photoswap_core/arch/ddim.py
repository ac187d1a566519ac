"""The reference's DDIM on a discrete variance-preserving model, in ComfyUI's terms (DESIGN.md §2).

diffusers' DDIMScheduler(scaled_linear 0.00085–0.012, set_alpha_to_one=False, steps_offset=1, "leading" spacing),
eta 0. For N steps the timesteps are t_k = (N-1-k)·(1000//N) + 1 and the step after the last one lands on ᾱ_0 (not
ᾱ=1). In ComfyUI's k-space (x_k = x_VP·√(1+σ²), ᾱ = 1/(1+σ²)), deterministic DDIM is exactly Euler over the N+1 sigmas
[σ(t_0), …, σ(t_{N-1}), σ(0)], so the same sigmas drive inversion (reversed) and sampling.
"""
from __future__ import annotations

import math

import torch

from ..errors import PhotoswapInputError
from .base import Schedule


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1) -> list[int]:
    if steps < 2:
        raise PhotoswapInputError("steps", f"at least 2 steps (got {steps})", "use 50 (the paper's setting) or 20–100")
    if steps > num_train_timesteps:
        raise PhotoswapInputError("steps", f"at most {num_train_timesteps} steps (got {steps})", "use 50")
    ratio = num_train_timesteps // steps
    return [k * ratio + steps_offset for k in range(steps - 1, -1, -1)]


def ddim_schedule(model_sampling, steps: int) -> Schedule:
    """DDIM schedule for `steps` steps from a ComfyUI `model_sampling` object (discrete, ε or v)."""
    table = getattr(model_sampling, "sigmas", None)
    if table is None or table.dim() != 1 or table.shape[0] < 2:
        raise PhotoswapInputError(
            "model", "a discrete-time diffusion model (SD1.x, SD2.x or SDXL)",
            "load an SD1.x/SD2.x/SDXL checkpoint; flow-matching models (SD3, Flux) are not supported yet")
    timesteps = ddim_timesteps(steps, num_train_timesteps=int(table.shape[0]))
    index = torch.tensor(timesteps + [0], dtype=torch.long)
    sigmas = table.detach().to("cpu", torch.float32)[index].clone()
    return Schedule(timesteps=tuple(timesteps), sigmas=sigmas)


def alpha_bar(sigma: float) -> float:
    """ᾱ of a k-space sigma."""
    return 1.0 / (1.0 + sigma * sigma)


def ddim_step(x_vp, eps, alpha_from: float, alpha_to: float):
    """Deterministic DDIM move of x from ᾱ_from to ᾱ_to with noise estimate eps (either direction)."""
    x0 = (x_vp - math.sqrt(1.0 - alpha_from) * eps) / math.sqrt(alpha_from)
    return math.sqrt(alpha_to) * x0 + math.sqrt(1.0 - alpha_to) * eps


def k_scale(sigma: float) -> float:
    """x_k = x_VP · √(1+σ²): the one place this factor is written."""
    return math.sqrt(1.0 + sigma * sigma)
