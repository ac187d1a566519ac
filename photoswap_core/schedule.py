"""The one DDIM schedule every Photoswap stage uses, built from the model's own `model_sampling`.

Reference semantics (DESIGN.md §2): diffusers' DDIMScheduler(scaled_linear 0.00085–0.012, set_alpha_to_one=False,
steps_offset=1, "leading" spacing), eta 0. For N steps the timesteps are t_k = (N-1-k)·(1000//N) + 1 and the step
after the last one lands on ᾱ_0 (not ᾱ=1). In ComfyUI's k-space, deterministic DDIM is exactly Euler over the N+1
sigmas [σ(t_0), …, σ(t_{N-1}), σ(0)], so the same sigmas drive inversion (reversed) and sampling.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import PhotoswapInputError


@dataclass(frozen=True)
class DDIMSchedule:
    timesteps: tuple[int, ...]  # N integer timesteps, descending (981, 961, …, 1 for N = 50)
    sigmas: torch.Tensor  # N+1 float32 k-space sigmas: σ(t_0) … σ(t_{N-1}), σ(0)

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def alpha_bar(self, index: int) -> float:
        """ᾱ at sigma index `index` (0 … N)."""
        sigma = float(self.sigmas[index])
        return 1.0 / (1.0 + sigma * sigma)


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1) -> list[int]:
    if steps < 2:
        raise PhotoswapInputError("steps", f"at least 2 steps (got {steps})", "use 50 (the paper's setting) or 20–100")
    if steps > num_train_timesteps:
        raise PhotoswapInputError("steps", f"at most {num_train_timesteps} steps (got {steps})", "use 50")
    ratio = num_train_timesteps // steps
    return [k * ratio + steps_offset for k in range(steps - 1, -1, -1)]


def build_schedule(model_sampling, steps: int) -> DDIMSchedule:
    """DDIM schedule for `steps` steps from a ComfyUI `model_sampling` object (discrete, ε or v)."""
    table = getattr(model_sampling, "sigmas", None)
    if table is None or table.dim() != 1 or table.shape[0] < 2:
        raise PhotoswapInputError(
            "model", "a discrete-time diffusion model (SD1.x, SD2.x or SDXL)",
            "load an SD1.x/SD2.x/SDXL checkpoint; flow-matching models (SD3, Flux) are not supported yet")
    timesteps = ddim_timesteps(steps, num_train_timesteps=int(table.shape[0]))
    index = torch.tensor(timesteps + [0], dtype=torch.long)
    sigmas = table.detach().to("cpu", torch.float32)[index].clone()
    return DDIMSchedule(timesteps=tuple(timesteps), sigmas=sigmas)
