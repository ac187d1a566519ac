"""Evaluate the model's prediction directly, outside ComfyUI's sampler (inversion, previews, conditioning kwargs).

Everything goes through ComfyUI's own objects: the adapter's conditioning kwargs (the model's `extra_conds`, SDXL's
ADM vector included) and `apply_model` (so wrappers, patches and weight patches such as LoRA apply). The model is
loaded through ComfyUI's model management first. Latents here are model-space latents (arch/base.py).
"""
from __future__ import annotations

import torch

from .arch import inspect_model


class DirectEvaluator:
    """The prediction d(x, σ, context) with d = (x_sampler − denoised)/σ: ε for VP models (float32 result)."""

    def __init__(self, model, latent_shape, transformer_options=None, arch=None):
        import comfy.model_management as mm

        mm.load_models_gpu([model])
        self.arch = arch or inspect_model(model)
        self.patcher = model
        self.base = model.model
        self.device = model.load_device
        self.latent_shape = tuple(latent_shape)
        options = model.model_options.get("transformer_options", {})
        self.transformer_options = dict(options) if transformer_options is None else transformer_options

    def model_kwargs(self, conditioning_entry) -> dict:
        """The model's conditioning kwargs for one CONDITIONING entry ({'c_crossattn': …, 'y': … (SDXL)})."""
        return self.arch.model_kwargs(self.patcher, conditioning_entry, self.latent_shape, self.device)

    def eps(self, x: torch.Tensor, sigma: float, c_crossattn: torch.Tensor, y: torch.Tensor | None = None,
            **extra):
        """The prediction at noise level σ for model-space latents x [B, C, h, w] (the velocity for flow models);
        `extra`: the family's other conditioning kwargs (Flux: guidance)."""
        batch = x.shape[0]
        x_in = self.arch.to_sampler(x, sigma)
        sigmas = torch.full((batch,), sigma, device=x.device, dtype=torch.float32)
        kwargs = dict(extra)
        if y is not None:
            kwargs["y"] = y.expand(batch, -1) if y.shape[0] == 1 else y
        context = c_crossattn.expand(batch, -1, -1) if c_crossattn.shape[0] == 1 else c_crossattn
        options = dict(self.transformer_options)
        options["cond_or_uncond"] = [0]
        options["sigmas"] = sigmas
        denoised = self.base.apply_model(x_in, sigmas, c_crossattn=context, transformer_options=options, **kwargs)
        return (x_in - denoised) / sigma
