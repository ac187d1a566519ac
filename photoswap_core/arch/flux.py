"""Flux (Flux-dev / Flux-schnell, ComfyUI's `supported_models.Flux`): the adapter's second implementation, an MM-DiT.

Facts owned here (docs/flux_notes.md has the checks against ComfyUI 0.3.75): the 16-channel ×8 latent with its scale
*and* shift; the T5 context (padded to 256+ tokens) plus the CLIP-L pooled vector `y` and the distilled guidance as
model inputs; ComfyUI's own rectified-flow sigmas (ModelSamplingFlux, so a shift patch is honoured) and CONST sampling
(sampler space = model space, `move` is the flow ODE's Euler step); joint [text; image] attention in double and
single blocks, reached through `transformer_options["optimized_attention_override"]` on the patched clone (plus a
DIFFUSION_MODEL wrapper that tells it the text and image token counts, which ComfyUI does not pass). Which blocks
carry which swap is configurable (`swap_rules.SiteSets`); `FluxDiT.sites` holds the documented defaults.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import PhotoswapInputError
from .base import Architecture, LatentFormat, Schedule, TextContext, single_conditioning

LENGTHS_KEY = "photoswap_tokens"  # transformer_options entry: (text tokens, token grid h, token grid w)
CONFIGS = {"Flux": "flux", "FluxSchnell": "flux"}
SCHEDULER = "simple"  # BasicScheduler's choice in ComfyUI's Flux workflows: sigma(1), sigma(1 - 1/N), …, 0
FLUX_DEV_DEPTH = (19, 38)
CFG_FIX = ("set cfg to 1: Flux-dev's guidance is distilled into the model and comes from the conditioning's "
           "'guidance' (FluxGuidance node), there is no conditional/unconditional pair to mix")


def default_sites(double: int, single: int) -> dict:
    """The documented defaults per role (docs/flux_notes.md §8): at Flux-dev's depth, self-output in Stable Flow's
    "vital layers" (double 0, 1, 17, 18; single 6, 9, 34, 35, 37 = its 57-layer indices 25, 28, 53, 54, 56),
    self-map in single 20-37 (RF-Solver-Edit's V-injection blocks), cross-map and LocalBlend in every double block.
    At any other depth (the literature's sets name Flux-dev's blocks): self-output and self-map in every single
    block, cross-map and LocalBlend in every double block (where text and image streams are still separate).
    Where the output swap fires the image rows are the source's, so the cross-map edit acts outside it."""
    doubles = tuple(("double", i) for i in range(double))
    singles = tuple(("single", i) for i in range(single))
    if (double, single) != FLUX_DEV_DEPTH:
        return {"self_output": singles, "self_map": singles, "cross_map": doubles, "blend": doubles}
    return {"self_output": tuple(("double", i) for i in (0, 1, 17, 18)) + tuple(("single", i) for i in
                                                                                (6, 9, 34, 35, 37)),
            "self_map": tuple(("single", i) for i in range(20, 38)),
            "cross_map": tuple(("double", i) for i in range(double)),
            "blend": tuple(("double", i) for i in range(double))}


@dataclass(frozen=True)
class FluxDiT(Architecture):
    family: str
    config_name: str
    prediction: str
    latent: LatentFormat
    text: TextContext
    depth: tuple = (0, 0)  # (double blocks, single blocks)
    guidance_embed: bool = True
    sites_joint: bool = True  # marks the joint-attention family for the stages (`SwapRun` dispatch)

    # ---- detection ---------------------------------------------------------------------------------------------
    @classmethod
    def detect(cls, model) -> "FluxDiT | None":
        import comfy.supported_models as sm

        base = getattr(model, "model", None)
        config = getattr(base, "model_config", None)
        if config is None or type(config).__name__ not in CONFIGS or type(config) is not getattr(
                sm, type(config).__name__, None):
            return None
        unet = base.diffusion_model
        fmt = base.latent_format
        return cls(family="flux", config_name=type(config).__name__, prediction="flow",
                   latent=LatentFormat(channels=int(fmt.latent_channels), downscale=8, scale=float(fmt.scale_factor),
                                       shift=float(fmt.shift_factor), space="Flux latent"),
                   text=TextContext(tokenizer="t5", tokens=0, width=int(config.unet_config["context_in_dim"]),
                                    pooled=True),
                   depth=(len(unet.double_blocks), len(unet.single_blocks)),
                   guidance_embed=bool(config.unet_config.get("guidance_embed", False)))

    @classmethod
    def families(cls) -> set:
        return {"flux"}

    @classmethod
    def from_info(cls, info) -> "FluxDiT":
        import comfy.latent_formats

        fmt = comfy.latent_formats.Flux()
        return cls(family=info.family, config_name=info.config_name, prediction=info.prediction,
                   latent=LatentFormat(channels=16, downscale=int(info.downscale), scale=float(info.latent_scale),
                                       shift=float(fmt.shift_factor), space="Flux latent"),
                   text=TextContext(tokenizer="t5", tokens=0, width=0, pooled=True))

    def __eq__(self, other):
        return isinstance(other, FluxDiT) and self.info == other.info

    def __hash__(self):
        return hash(self.info)

    def describe(self) -> str:
        return f"Flux ({self.config_name}, rectified flow)"

    # ---- latents: ComfyUI's own arithmetic (latent_formats.Flux.process_in / process_out) ----------------------
    def to_model_space(self, samples: torch.Tensor) -> torch.Tensor:
        return (samples.float() - self.latent.shift) * self.latent.scale

    def to_latent(self, x: torch.Tensor) -> torch.Tensor:
        return (x / self.latent.scale) + self.latent.shift

    def check_latent(self, samples: torch.Tensor, input_name: str) -> None:
        fix = "connect VAE Encode (with the Flux VAE, ae.safetensors) or an Empty SD3/Flux latent (16 channels)"
        if samples.dim() != 4 or samples.shape[1] != self.latent.channels:
            raise PhotoswapInputError(input_name, f"a Flux LATENT [1, {self.latent.channels}, h, w] (got shape "
                                                  f"{tuple(samples.shape)})", fix)
        if samples.shape[0] != 1:
            raise PhotoswapInputError(input_name, f"one image on Flux (got a latent batch of {samples.shape[0]})",
                                      "clips (a batch of frames) are supported on SD1.x/SD2.x/SDXL only so far; on "
                                      "Flux run one image per run (Latent From Batch)")
        if not torch.isfinite(samples).all():
            raise PhotoswapInputError(input_name, "finite latent values (found NaN or Inf)", "check the image and VAE")

    def sampler_scales(self, sigmas) -> list[float]:
        return [1.0 for _ in sigmas]  # CONST sampling: sampler space is model space

    def to_sampler(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return x

    def stock_start_latent(self, x_t: torch.Tensor, sigma: float) -> torch.Tensor:
        """z_T as a LATENT. A stock Flux sampler starting at σ = 1 multiplies its latent by 0 (CONST noise scaling):
        z_T only continues there when given as the *noise* in model space (`to_model_space` of this)."""
        return self.to_latent(x_t.float()).contiguous()

    # ---- guidance ------------------------------------------------------------------------------------------------
    def check_guidance(self, method: str | None, cfg: float, input_name: str = "cfg") -> None:
        """Flux has no CFG pair: only `direct` inversion and cfg 1 can be honoured."""
        if method is not None and method != "direct":
            raise PhotoswapInputError(
                "method", f"the 'direct' inversion on Flux (got {method!r}: null-text optimisation and the negative-"
                          "prompt/ddim variants need an unconditional branch, which Flux-dev's distilled guidance "
                          "does not have)", "set method to 'direct' (flow-ODE inversion with the source pinned)")
        if abs(float(cfg) - 1.0) > 1e-9:
            raise PhotoswapInputError(input_name, f"cfg 1 on Flux (got {cfg:g})", CFG_FIX)

    inverts_as_a_sampler_pass = True  # `recorder.invert_flow`: the inversion records the source pass on its way

    def check_solver(self, solver: str) -> None:
        """Flux takes every solver of `inversion.SOLVERS` (the list is checked there)."""

    # ---- text --------------------------------------------------------------------------------------------------
    def prompt_entry(self, model, conditioning, input_name: str):
        tensor, options = single_conditioning(conditioning, input_name)
        width = int(tensor.shape[-1])
        if self.text.width and width != self.text.width:
            raise PhotoswapInputError(
                input_name, f"a prompt encoded by Flux's T5 ({self.text.width} values per token; this one has "
                            f"{width})",
                "encode the prompts with the Flux text encoders (DualCLIPLoader type flux: t5xxl + clip_l)")
        if options.get("pooled_output") is None:
            raise PhotoswapInputError(input_name, "a Flux CONDITIONING with the CLIP-L pooled vector",
                                      "encode with CLIP Text Encode on the Flux DualCLIPLoader's CLIP")
        return tensor, options

    # {'c_crossattn', 'y' (CLIP-L pooled), 'guidance'}: what ComfyUI's `model_base.Flux.extra_conds` builds
    conditioning_keys = ("c_crossattn", "y", "guidance")

    # ---- sampling math -------------------------------------------------------------------------------------------
    def schedule(self, model, steps: int) -> Schedule:
        import comfy.samplers

        if steps < 1:
            raise PhotoswapInputError("steps", f"at least 1 step (got {steps})", "use 28 (Flux-dev's usual count)")
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), SCHEDULER, steps)
        return Schedule(timesteps=(), sigmas=sigmas.detach().to("cpu", torch.float32).clone())

    def move(self, x, prediction, sigma_from: float, sigma_to: float):
        """Euler step of the flow ODE dx/dσ = v (either direction); `prediction` is the velocity v."""
        return x + (sigma_to - sigma_from) * prediction

    # ---- attention ---------------------------------------------------------------------------------------------
    def attention_layers(self, model) -> list[tuple]:
        unet = model.model.diffusion_model
        return [("double", i) for i in range(len(unet.double_blocks))] + \
               [("single", i) for i in range(len(unet.single_blocks))]

    def sites(self, windows) -> dict:
        """role → frozenset of layer keys, the windows' `sites` overriding the defaults role by role."""
        chosen = default_sites(*self.depth)
        given = getattr(windows, "sites", None)
        if given is not None:
            for role in chosen:
                value = getattr(given, role)
                if value is not None:
                    chosen[role] = tuple(value)
        return {role: frozenset(layers) for role, layers in chosen.items()}

    def install_attention_patches(self, patched, make_patch) -> None:
        """One attention override on the clone (wrapping any existing one: another pack's kernel) dispatching by
        (block_type, block_index) to `make_patch("joint", layer, None)`; and the wrapper that counts tokens."""
        import comfy.patcher_extension

        options = patched.model_options.setdefault("transformer_options", {})
        prior = options.get("optimized_attention_override")
        patches = {layer: make_patch("joint", layer, None) for layer in self.attention_layers(patched)}
        options["optimized_attention_override"] = _JointOverride(patches, prior)
        patch_size = int(patched.model.diffusion_model.patch_size)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "photoswap",
                                     _token_counter(patch_size))

    def attention(self, q, k, v, extra) -> torch.Tensor:
        return extra["plain"](q, k, v)

    def joint_layout(self, extra) -> tuple:
        """(text tokens, slice of the image tokens, token grid (h, w)) of a joint-attention call: text first."""
        l_txt, gh, gw = extra[LENGTHS_KEY]
        return l_txt, slice(l_txt, l_txt + gh * gw), (gh, gw)

    def layer_level(self, extra) -> int:
        return 0  # one token resolution

    def token_grid(self, extra) -> tuple:
        return tuple(extra[LENGTHS_KEY][1:])

    def self_map_layer(self, level: int) -> bool:
        return True

    def blend_layer(self, level: int, extra) -> bool:
        return True


class _JointOverride:
    """`optimized_attention_override(func, q, k, v, heads, **kwargs)`: the Photoswap patch of this block, given
    `extra` = the call's transformer_options plus `plain(q, k, v)` (the kernel, or the prior override) and `mask`.
    Deep copies (ModelPatcher.clone) share it: it holds no per-run state."""

    def __init__(self, patches: dict, prior):
        self.patches, self.prior = patches, prior

    def __deepcopy__(self, memo):
        return self

    def __call__(self, func, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        patch = self.patches.get((options.get("block_type"), options.get("block_index")))
        heads, rest = args[3], args[4:]
        prior = self.prior

        def plain(q, k, v):
            if prior is not None:
                return prior(func, q, k, v, heads, *rest, **kwargs)
            return func(q, k, v, heads, *rest, **kwargs)

        if patch is None or LENGTHS_KEY not in options or not kwargs.get("skip_reshape", False):
            return plain(*args[:3])
        extra = dict(options)
        extra.update(plain=plain, mask=kwargs.get("mask"))
        return patch(args[0], args[1], args[2], extra)


def _token_counter(patch_size: int):
    """DIFFUSION_MODEL wrapper: (text tokens, token grid) of this call into transformer_options (Flux's forward
    takes the text first, then the ⌈h/p⌉×⌈w/p⌉ image tokens; Kontext reference tokens after them)."""
    def wrapper(executor, x, timestep, context, *args, **kwargs):
        options = args[4] if len(args) > 4 else kwargs.get("transformer_options")
        if options is not None:
            options[LENGTHS_KEY] = (int(context.shape[1]), math.ceil(x.shape[-2] / patch_size),
                                    math.ceil(x.shape[-1] / patch_size))
        return executor(x, timestep, context, *args, **kwargs)

    return wrapper
