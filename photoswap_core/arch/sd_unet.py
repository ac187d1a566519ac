"""The SD-family UNet (SD1.x, SD2.x incl. v-prediction, SDXL): the adapter's first implementation.

Facts owned here: which ComfyUI model configs belong to the family, the 4-channel ×8 VP latent, the 77-token CLIP
context (SDXL: plus the pooled ADM vector `y`), the reference DDIM schedule and step (arch/ddim.py), the
BasicTransformerBlocks of input/middle/output blocks with their attn1 (self) and attn2 (cross) replace patches, and
the level rules: self-map swap at every level but the full-resolution one, LocalBlend at level 2 outside the middle
block (at 512 px on SD1.x: the reference's "≤ 32² query tokens" and "the 16×16 maps"; below 256 px a finer level,
so that the blend maps keep 8 cells a side: `SDUNet.blend_level`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..clip_tokens import CONTEXT_TOKENS
from ..errors import PhotoswapInputError
from . import ddim
from .base import Architecture, LatentFormat, Schedule, TextContext, single_conditioning

FAMILY_OF_CONFIG = {"SD15": "sd1", "SD20": "sd2", "SD21UnclipL": "sd2", "SD21UnclipH": "sd2", "SDXL": "sdxl",
                    "SSD1B": "sdxl", "Segmind_Vega": "sdxl", "KOALA_700M": "sdxl", "KOALA_1B": "sdxl"}
CONTEXT_WIDTHS = "SD1.x prompts have 768 values per token, SD2.x 1024, SDXL 2048"


@dataclass(frozen=True)
class SDUNet(Architecture):
    family: str
    config_name: str
    prediction: str
    latent: LatentFormat
    text: TextContext
    attention_levels: tuple = ()  # levels of the input blocks with transformers (() = unknown: the standard ones)

    # ---- detection ---------------------------------------------------------------------------------------------
    @classmethod
    def detect(cls, model) -> "SDUNet | None":
        """The adapter for a ComfyUI MODEL of the family, or None when it is another family."""
        import comfy.model_base as model_base
        import comfy.supported_models as sm

        base = getattr(model, "model", None)
        config = getattr(base, "model_config", None)
        if config is None:
            return None
        name = type(config).__name__
        family = next((fam for cls_name, fam in FAMILY_OF_CONFIG.items()
                       if getattr(sm, cls_name, None) is not None and type(config) is getattr(sm, cls_name)), None)
        if family is None:
            family = next((fam for cls_name, fam in (("SDXL", "sdxl"), ("SD20", "sd2"), ("SD15", "sd1"))
                           if isinstance(config, getattr(sm, cls_name))), None)
        if family is None:
            return None
        model_type = getattr(base, "model_type", None)
        prediction = {model_base.ModelType.EPS: "eps", model_base.ModelType.V_PREDICTION: "v"}.get(model_type)
        if prediction is None:
            raise PhotoswapInputError(
                "model", f"an ε- or v-prediction model (got {getattr(model_type, 'name', model_type)})",
                "use a standard SD1.x/SD2.x/SDXL checkpoint without a ModelSamplingDiscrete/EDM override")
        latent_format = base.latent_format
        if getattr(latent_format, "shift_factor", None):
            raise PhotoswapInputError("model", "a latent format without shift", f"{name} latents are not supported")
        context = config.unet_config.get("context_dim")
        return cls(family=family, config_name=name, prediction=prediction,
                   latent=LatentFormat(channels=int(latent_format.latent_channels), downscale=8,
                                       scale=float(latent_format.scale_factor)),
                   text=TextContext(tokenizer="clip-bpe", tokens=CONTEXT_TOKENS,
                                    width=int(context) if context is not None else 0,
                                    pooled=family == "sdxl"),
                   attention_levels=_attention_levels(config.unet_config))

    @classmethod
    def families(cls) -> set:
        return set(FAMILY_OF_CONFIG.values())

    @classmethod
    def from_info(cls, info) -> "SDUNet":
        """The adapter of a saved inversion's model (ModelInfo): enough to read its latents; the text width is
        unknown until a MODEL is connected (0)."""
        return cls(family=info.family, config_name=info.config_name, prediction=info.prediction,
                   latent=LatentFormat(channels=4, downscale=int(info.downscale), scale=float(info.latent_scale)),
                   text=TextContext(tokenizer="clip-bpe", tokens=CONTEXT_TOKENS, width=0, pooled=info.family == "sdxl"))

    def __eq__(self, other):  # the text width of an adapter rebuilt from a file is unknown: compare the identity
        return isinstance(other, SDUNet) and self.info == other.info

    def __hash__(self):
        return hash(self.info)

    # ---- latents -----------------------------------------------------------------------------------------------
    def check_latent(self, samples: torch.Tensor, input_name: str) -> None:
        """An image LATENT [F, 4, h, w]: F = 1 is one image, F > 1 a clip of F frames (photoswap_core/frames.py)."""
        if type(samples) is not torch.Tensor:  # noqa: E721 — ComfyUI's NestedTensor holds latents of several sizes
            raise PhotoswapInputError(
                input_name, f"frames of one size in one latent tensor (got a {type(samples).__name__})",
                "resize every frame to one size (Upscale Image / ImageScale) before VAE Encode, or run each size "
                "separately")
        if samples.dim() == 5:
            raise PhotoswapInputError(
                input_name, f"an image LATENT [frames, 4, h, w] (got a video-model latent {tuple(samples.shape)})",
                "encode the frames (an IMAGE batch, e.g. from Get Video Components) with the image model's VAE Encode")
        if samples.dim() != 4:
            raise PhotoswapInputError(input_name, f"an image LATENT [F, 4, h, w] (got shape {tuple(samples.shape)})",
                                      "connect VAE Encode / Empty Latent Image of an SD1.x/SD2.x/SDXL model")
        if samples.shape[0] < 1:
            raise PhotoswapInputError(input_name, "at least one frame (got an empty batch)", "connect a non-empty image")
        if samples.shape[1] != self.latent.channels:
            raise PhotoswapInputError(input_name, f"{self.latent.channels} latent channels (got {samples.shape[1]})",
                                      "use an SD1.x/SD2.x/SDXL VAE; other latent spaces are not supported")
        if not torch.isfinite(samples).all():
            raise PhotoswapInputError(input_name, "finite latent values (found NaN or Inf)",
                                      "check the image and the VAE (an fp16 VAE overflow gives NaN; try --fp32-vae)")

    def sampler_scales(self, sigmas) -> list[float]:
        return [ddim.k_scale(float(s)) for s in sigmas]

    def to_sampler(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return x * ddim.k_scale(sigma)

    def stock_start_latent(self, x_t: torch.Tensor, sigma: float) -> torch.Tensor:
        return (x_t.float() * ddim.k_scale(sigma) / self.latent.scale).contiguous()

    # ---- text --------------------------------------------------------------------------------------------------
    def prompt_entry(self, model, conditioning, input_name: str):
        """One 77-token prompt whose width is the model's cross-attention width (the same family's CLIP); else the
        UNet would fail with a raw shape error deep inside sampling."""
        tensor, options = single_conditioning(conditioning, input_name)
        if tensor.shape[1] != self.text.tokens:
            raise PhotoswapInputError(
                input_name, f"a prompt of at most {self.text.tokens} tokens (the embedding has {tensor.shape[1]} "
                            "tokens)",
                f"shorten the prompt: Photoswap aligns the source and target prompts token by token within one "
                f"{self.text.tokens}-token window")
        width = int(tensor.shape[-1])
        context_dim = _context_dim(model)
        if context_dim is not None and width != context_dim:
            raise PhotoswapInputError(
                input_name, f"a prompt encoded by this model's CLIP ({context_dim} values per token; this one has "
                            f"{width})",
                f"encode the prompts with the CLIP of the same checkpoint (or Concept Loader) as the MODEL: "
                f"{CONTEXT_WIDTHS}")
        return tensor, options

    # ---- sampling math -------------------------------------------------------------------------------------------
    def schedule(self, model, steps: int) -> Schedule:
        return ddim.ddim_schedule(model.get_model_object("model_sampling"), steps)

    def move(self, x, prediction, sigma_from: float, sigma_to: float):
        return ddim.ddim_step(x, prediction, ddim.alpha_bar(sigma_from), ddim.alpha_bar(sigma_to))

    # ---- attention ---------------------------------------------------------------------------------------------
    def attention_layers(self, model) -> list[tuple]:
        """(block_name, number, index) of every BasicTransformerBlock, in call order."""
        from comfy.ldm.modules.attention import SpatialTransformer

        unet = model.model.diffusion_model
        layers = []
        for name, blocks in (("input", unet.input_blocks), ("middle", [unet.middle_block]),
                             ("output", unet.output_blocks)):
            for number, block in enumerate(blocks):
                for module in block:
                    if isinstance(module, SpatialTransformer):
                        layers.extend((name, number, i) for i in range(len(module.transformer_blocks)))
        return layers

    def install_attention_patches(self, patched, make_patch) -> None:
        replace = patched.model_options.setdefault("transformer_options", {}).get("patches_replace", {})
        for layer in self.attention_layers(patched):
            for role, kind in (("self", "attn1"), ("cross", "attn2")):
                existing = replace.get(kind, {})
                prior = existing.get(layer) or existing.get(layer[:2])
                patched.set_model_patch_replace(make_patch(role, layer, prior), kind, layer[0], layer[1], layer[2])

    def attention(self, q, k, v, extra):
        from comfy.ldm.modules.attention import optimized_attention

        return optimized_attention(q, k, v, extra["n_heads"], attn_precision=extra.get("attn_precision"))

    def layer_level(self, extra) -> int:
        full = extra["original_shape"][2]
        here = extra["activations_shape"][2]
        level = 0
        while full > here:
            full = (full + 1) // 2
            level += 1
        return level

    def token_grid(self, extra) -> tuple:
        return tuple(extra["activations_shape"][2:])

    def self_map_layer(self, level: int) -> bool:
        """All but the full-resolution level (SD1.x 512 px: the 11 layers with ≤ 32² tokens)."""
        return level >= 1

    def blend_layer(self, level: int, extra) -> bool:
        """The blend level's down and up blocks, not the middle block (see `blend_level`)."""
        return level == self.blend_level(tuple(extra["original_shape"][2:])) and extra["block"][0] != "middle"

    def blend_level(self, latent_hw: tuple) -> int:
        """Level 2 (SD1.x 512 px: the reference's 16×16 maps) while its maps keep ≥ BLEND_MIN_CELLS on the short
        side; on smaller latents the deepest attention level that does (else the finest one). Why: LocalBlend
        dilates the maps 3×3 before thresholding, and at 2×2 cells (level 2 of an 8×8 latent) that covers the whole
        image, so the mask was all ones and LocalBlend silently did nothing. Images ≥ 256 px (SD1/SD2/SDXL) keep
        level 2."""
        levels = sorted(lv for lv in (self.attention_levels or STANDARD_ATTENTION_LEVELS[self.family]) if lv <= 2)
        if not levels:
            return 2
        short = min(latent_hw)
        fits = [lv for lv in levels if _cells(short, lv) >= BLEND_MIN_CELLS]
        return max(fits) if fits else min(levels)


BLEND_MIN_CELLS = 8  # LocalBlend maps need this many cells on the short side for a local 3×3 dilation
STANDARD_ATTENTION_LEVELS = {"sd1": (0, 1, 2), "sd2": (0, 1, 2), "sdxl": (1, 2)}


def _cells(size: int, level: int) -> int:
    """Tokens along one side after `level` downsamplings (each halves, rounding up: ComfyUI's padded convolutions)."""
    for _ in range(level):
        size = (size + 1) // 2
    return size


def _attention_levels(unet_config: dict) -> tuple:
    """Levels whose input blocks hold transformers, from ComfyUI's unet_config (transformer_depth has one entry per
    input res block); () when the config does not say."""
    depth, mult = unet_config.get("transformer_depth"), unet_config.get("channel_mult")
    blocks = unet_config.get("num_res_blocks")
    if not isinstance(depth, (list, tuple)) or not mult or blocks is None:
        return ()
    blocks = [blocks] * len(mult) if isinstance(blocks, int) else list(blocks)
    levels, start = [], 0
    for level, n in enumerate(blocks):
        if any(d > 0 for d in depth[start:start + n]):
            levels.append(level)
        start += n
    return tuple(levels)


def _context_dim(model):
    config = getattr(getattr(model, "model", None), "model_config", None)
    context_dim = getattr(config, "unet_config", {}).get("context_dim") if config is not None else None
    return None if context_dim is None else int(context_dim)
