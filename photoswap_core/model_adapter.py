"""Model-family adapter: what kind of model a ComfyUI MODEL is, and how to evaluate ε on it directly.

Everything goes through ComfyUI's own objects: `model_sampling` for the noise parameterisation (ε or v), the model's
`extra_conds` for the conditioning (SDXL's ADM vector included), `apply_model` for the UNet (so wrappers, patches and
weight patches such as LoRA apply). Latents handled here are "VP" latents: the VAE latent times the family's scale
factor, as the reference code uses them; ComfyUI's k-space latent is x_VP·√(1+σ²).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import PhotoswapInputError

SUPPORTED_FAMILIES = {"SD15": "sd1", "SD20": "sd2", "SD21UnclipL": "sd2", "SD21UnclipH": "sd2", "SDXL": "sdxl",
                      "SSD1B": "sdxl", "Segmind_Vega": "sdxl", "KOALA_700M": "sdxl", "KOALA_1B": "sdxl"}


@dataclass(frozen=True)
class ModelInfo:
    family: str  # "sd1", "sd2", "sdxl"
    config_name: str  # ComfyUI's supported-model class name, e.g. "SD15"
    prediction: str  # "eps" or "v"
    latent_scale: float  # VAE latent → VP latent factor (0.18215 SD1/2, 0.13025 SDXL)
    downscale: int  # pixels per latent cell (8)


def inspect_model(model) -> ModelInfo:
    """Identify a ComfyUI MODEL (ModelPatcher); refuse families Photoswap does not support yet, naming them."""
    import comfy.model_base as model_base
    import comfy.supported_models as sm

    base = getattr(model, "model", None)
    config = getattr(base, "model_config", None)
    name = type(config).__name__ if config is not None else type(base).__name__
    family = None
    for cls_name, fam in SUPPORTED_FAMILIES.items():
        cls = getattr(sm, cls_name, None)
        if cls is not None and type(config) is cls:
            family = fam
    if family is None and config is not None:
        for cls_name, fam in (("SDXL", "sdxl"), ("SD20", "sd2"), ("SD15", "sd1")):
            if isinstance(config, getattr(sm, cls_name)):
                family = fam
                break
    if family is None:
        raise PhotoswapInputError(
            "model", f"an SD1.x, SD2.x or SDXL model (got a {name} model)",
            f"{name} is not supported by Photoswap yet (it needs a UNet with cross-attention and a discrete DDIM "
            "schedule); load an SD1.x, SD2.x or SDXL checkpoint")
    model_type = getattr(base, "model_type", None)
    if model_type == model_base.ModelType.EPS:
        prediction = "eps"
    elif model_type == model_base.ModelType.V_PREDICTION:
        prediction = "v"
    else:
        raise PhotoswapInputError(
            "model", f"an ε- or v-prediction model (got {getattr(model_type, 'name', model_type)})",
            "use a standard SD1.x/SD2.x/SDXL checkpoint without a ModelSamplingDiscrete/EDM override")
    latent_format = base.latent_format
    if getattr(latent_format, "shift_factor", None):
        raise PhotoswapInputError("model", "a latent format without shift", f"{name} latents are not supported")
    return ModelInfo(family=family, config_name=name, prediction=prediction,
                     latent_scale=float(latent_format.scale_factor), downscale=8)


def single_conditioning(conditioning, input_name: str):
    """The (tensor, options) pair of a one-entry CONDITIONING; Photoswap needs one 77-token prompt per role."""
    if not isinstance(conditioning, list) or len(conditioning) == 0:
        raise PhotoswapInputError(input_name, "a CONDITIONING from CLIP Text Encode or Photoswap Prompt Pair",
                                  "connect an encoded prompt")
    if len(conditioning) != 1:
        raise PhotoswapInputError(
            input_name, f"a CONDITIONING with one entry (got {len(conditioning)}: combined or concatenated prompts)",
            "connect a single encoded prompt; Conditioning Combine/Concat are not supported by Photoswap")
    tensor, options = conditioning[0]
    if tensor.dim() != 3 or tensor.shape[0] != 1:
        raise PhotoswapInputError(input_name, f"one prompt embedding [1, tokens, C] (got {tuple(tensor.shape)})",
                                  "encode one prompt")
    if tensor.shape[1] != 77:
        raise PhotoswapInputError(
            input_name, f"a prompt of at most 77 tokens (the embedding has {tensor.shape[1]} tokens)",
            "shorten the prompt: Photoswap aligns the source and target prompts token by token within one 77-token "
            "window")
    return tensor, options


def vp_to_k(x_vp: torch.Tensor, sigma: float) -> torch.Tensor:
    return x_vp * math.sqrt(1.0 + sigma * sigma)


def k_to_vp(x_k: torch.Tensor, sigma: float) -> torch.Tensor:
    return x_k / math.sqrt(1.0 + sigma * sigma)


class DirectEvaluator:
    """Evaluates ε(x_VP, σ, context) with the model's own `apply_model`, outside ComfyUI's sampler.

    Used by inversion (which needs gradients with respect to the context) and for conditioning tensors. The model is
    loaded through ComfyUI's model management first, so LoRA/weight patches are applied.
    """

    def __init__(self, model, latent_shape, transformer_options=None):
        import comfy.model_management as mm

        mm.load_models_gpu([model])
        self.patcher = model
        self.base = model.model
        self.device = model.load_device
        self.latent_shape = tuple(latent_shape)
        options = model.model_options.get("transformer_options", {})
        self.transformer_options = dict(options) if transformer_options is None else transformer_options

    def model_kwargs(self, conditioning_entry) -> dict:
        """ComfyUI's per-model conditioning for one CONDITIONING entry: {'c_crossattn': …, 'y': … (SDXL)}."""
        tensor, options = conditioning_entry
        params = dict(options)
        params["cross_attn"] = tensor
        params["device"] = self.device
        noise = torch.zeros(self.latent_shape, device=self.device)
        params["noise"] = noise
        params.setdefault("width", self.latent_shape[3] * 8)
        params.setdefault("height", self.latent_shape[2] * 8)
        params.setdefault("prompt_type", "positive")
        out = {}
        for key, cond in self.base.extra_conds(**params).items():
            if key in ("c_crossattn", "y"):
                out[key] = cond.process_cond(batch_size=1, device=self.device).cond
        return out

    def eps(self, x_vp: torch.Tensor, sigma: float, c_crossattn: torch.Tensor, y: torch.Tensor | None = None):
        """ε at noise level σ for VP latents x_vp [B, 4, h, w] (float32 result)."""
        batch = x_vp.shape[0]
        x_in = vp_to_k(x_vp, sigma)
        sigmas = torch.full((batch,), sigma, device=x_vp.device, dtype=torch.float32)
        kwargs = {}
        if y is not None:
            kwargs["y"] = y.expand(batch, -1) if y.shape[0] == 1 else y
        context = c_crossattn.expand(batch, -1, -1) if c_crossattn.shape[0] == 1 else c_crossattn
        options = dict(self.transformer_options)
        options["cond_or_uncond"] = [0]
        options["sigmas"] = sigmas
        denoised = self.base.apply_model(x_in, sigmas, c_crossattn=context, transformer_options=options, **kwargs)
        return (x_in - denoised) / sigma
