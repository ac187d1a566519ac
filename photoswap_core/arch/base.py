"""The architecture adapter's interface: every question a pipeline stage asks about a model family.

The stages (inversion, recorder, swap sampler, preview, save/load) never test a family themselves; they ask the
`Architecture` that `arch.inspect_model(model)` returns. The SD-family UNets (SD1.x, SD2.x, SDXL) are the first
implementation (`sd_unet.SDUNet`); a DiT with joint text-image attention and a flow-matching schedule (Flux) is meant
to be a second one (docs/architecture.md says how).

Vocabulary:
- "model space": the latent the family's sampling math is written in (the VAE latent times its scale factor, minus
  its shift; for the SD family the VP latent x_VP of the reference code).
- "sampler space": ComfyUI's k-space, what its samplers and `apply_model` take (for VP models x_VP·√(1+σ²)).
- a LATENT's `samples` are unscaled VAE latents.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ..errors import PhotoswapInputError


@dataclass(frozen=True)
class ModelInfo:
    """The identity of a model as inversion files store it (format version 1 field names)."""
    family: str  # "sd1", "sd2", "sdxl"
    config_name: str  # ComfyUI's supported-model class name, e.g. "SD15"
    prediction: str  # "eps" or "v"
    latent_scale: float  # VAE latent → model-space factor
    downscale: int  # pixels per latent cell


@dataclass(frozen=True)
class LatentFormat:
    channels: int  # latent channels (4 for the SD family)
    downscale: int  # pixels per latent cell (8)
    scale: float  # VAE latent × scale = model-space latent (0.18215 SD1/2, 0.13025 SDXL)
    shift: float = 0.0
    space: str = "VP latent"  # what the model-space latent is called in messages

    def pixels(self, latent_hw) -> tuple[int, int]:
        """Image size (H, W) in pixels of a latent of size (h, w)."""
        return latent_hw[0] * self.downscale, latent_hw[1] * self.downscale


@dataclass(frozen=True)
class TextContext:
    tokenizer: str  # "clip-bpe" (SD family) — which tokenizer the prompt alignment reads
    tokens: int  # tokens per prompt window, start and end tokens included (77 for CLIP)
    width: int  # values per token of the cross-attention context
    pooled: bool  # a pooled text vector enters the model (SDXL's ADM `y`)


@dataclass(frozen=True)
class Schedule:
    """A sampling schedule: N+1 sampler-space sigmas (the last one is where sampling ends) and, for discrete-time
    models, the N integer timesteps they come from."""
    timesteps: tuple  # N ints, descending (981, 961, …, 1 for DDIM at N = 50); () for continuous-time models
    sigmas: torch.Tensor  # N+1 float32 sigmas

    @property
    def steps(self) -> int:
        return int(self.sigmas.shape[0]) - 1


class Architecture:
    """One model family. Implementations are frozen dataclasses with at least `family`, `config_name`,
    `prediction`, `latent` (LatentFormat) and `text` (TextContext); two instances that compare equal describe models
    that produce interchangeable inversions and traces."""

    family: str
    config_name: str
    prediction: str
    latent: LatentFormat
    text: TextContext

    # ---- identity ----------------------------------------------------------------------------------------------
    @property
    def info(self) -> ModelInfo:
        return ModelInfo(family=self.family, config_name=self.config_name, prediction=self.prediction,
                         latent_scale=self.latent.scale, downscale=self.latent.downscale)

    def describe(self) -> str:
        return f"{self.family} ({self.config_name}, {self.prediction}-prediction)"

    def weights_fingerprint(self, model) -> str:
        return weights_fingerprint(model)

    def check_same_model(self, model, made_with: "Architecture", fingerprint: str, input_name: str, made: str,
                         fix: str) -> None:
        """The one rule for "is this the model it was made with": the connected MODEL must have the family and
        prediction of the one `made` ("the inversion", "the trace") came from (else its latents mean something
        else) and the same weights (else it no longer reconstructs)."""
        if (self.family, self.prediction) != (made_with.family, made_with.prediction):
            raise PhotoswapInputError(
                input_name, f"a model like the one {made} was made with ({made} is from a {made_with.describe()} "
                            f"model; this MODEL is {self.describe()})", fix)
        if self.weights_fingerprint(model) != fingerprint:
            raise PhotoswapInputError(
                input_name, f"the model weights {made} was made with (the weights fingerprint differs: another "
                            "checkpoint, other LoRAs/strengths, or another weight precision)", fix)

    # ---- latents -----------------------------------------------------------------------------------------------
    def to_model_space(self, samples: torch.Tensor) -> torch.Tensor:
        """LATENT samples → model-space latent (float32)."""
        return samples.float() * self.latent.scale

    def to_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space latent → LATENT samples."""
        return x / self.latent.scale

    def check_latent(self, samples: torch.Tensor, input_name: str) -> None:
        raise NotImplementedError

    def sampler_scales(self, sigmas) -> list[float]:
        """Per sigma, the host float s with sampler-space latent = s · model-space latent."""
        raise NotImplementedError

    def to_sampler(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        raise NotImplementedError

    def stock_start_latent(self, x_t: torch.Tensor, sigma: float) -> torch.Tensor:
        """LATENT samples that a stock ComfyUI sampler (noise off, first sigma `sigma`) starts from to continue at
        the model-space latent x_t."""
        raise NotImplementedError

    def check_guidance(self, method: str | None, cfg: float, input_name: str = "cfg") -> None:
        """Refuse an inversion method (None: not an inversion) or a cfg this family cannot honour; the SD family
        honours every method and cfg."""

    # the inversion runs through ComfyUI's sampler as one pass that also records the source pass (flow models);
    # False: the DDIM inversion of `inversion.invert`, evaluated directly
    inverts_as_a_sampler_pass: bool = False

    def check_solver(self, solver: str) -> None:
        """Refuse an inversion ODE step this family does not have: the SD family inverts with DDIM ("euler": Euler
        over the DDIM sigmas is DDIM), the reference's; only flow models offer a second-order step."""
        if solver != "euler":
            raise PhotoswapInputError(
                "solver", f"'euler' on {self.describe()} (got {solver!r}: the SD-family inversion is DDIM, as the "
                          "reference runs it; the midpoint solver is for rectified-flow models such as Flux)",
                "set solver to 'euler'")

    # ---- text --------------------------------------------------------------------------------------------------
    def prompt_entry(self, model, conditioning, input_name: str):
        """The single (tensor, options) entry of a CONDITIONING, checked against this family's text context."""
        raise NotImplementedError

    conditioning_keys: tuple = ("c_crossattn", "y")  # which of the model's extra_conds its apply_model gets from us

    def model_kwargs(self, model, entry, latent_shape, device) -> dict:
        """The model's own conditioning kwargs for one CONDITIONING entry (what its `apply_model` takes), built by
        ComfyUI's `extra_conds` of the model as its sampler would: only `conditioning_keys` are kept."""
        tensor, options = entry
        params = dict(options)
        params.update(cross_attn=tensor, device=device, noise=torch.zeros(tuple(latent_shape), device=device))
        pixels_h, pixels_w = self.latent.pixels(latent_shape[-2:])
        params.setdefault("width", pixels_w)
        params.setdefault("height", pixels_h)
        params.setdefault("prompt_type", "positive")
        return {key: cond.process_cond(batch_size=1, device=device).cond
                for key, cond in model.model.extra_conds(**params).items() if key in self.conditioning_keys}

    # ---- sampling math -------------------------------------------------------------------------------------------
    def schedule(self, model, steps: int) -> Schedule:
        raise NotImplementedError

    def move(self, x: torch.Tensor, prediction: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        """Deterministic move of a model-space latent from σ_from to σ_to (either direction) with the model's
        prediction (ε for the SD family)."""
        raise NotImplementedError

    # ---- attention ---------------------------------------------------------------------------------------------
    def attention_layers(self, model) -> list:
        """The layer keys of every attention site, in call order."""
        raise NotImplementedError

    def install_attention_patches(self, patched, make_patch) -> None:
        """Install `make_patch(role, layer, prior)` ("self"/"cross") on every attention site of the clone
        `patched`; `prior` is a replace patch already there (another pack's), to be called for plain attention."""
        raise NotImplementedError

    def attention(self, q, k, v, extra) -> torch.Tensor:
        """The model's own attention computation for one site."""
        raise NotImplementedError

    def layer_level(self, extra) -> int:
        """How many times the latent was downsampled at this attention call (0 = full latent resolution)."""
        raise NotImplementedError

    def token_grid(self, extra) -> tuple:
        """(h, w) of the image tokens at this attention call."""
        raise NotImplementedError

    def self_map_layer(self, level: int) -> bool:
        raise NotImplementedError

    def blend_layer(self, level: int, extra) -> bool:
        raise NotImplementedError


def weights_fingerprint(model) -> str:
    """A cheap fingerprint of the diffusion weights: sums of a sample of unpatched tensors plus the weight-patch list
    (LoRA keys, strengths and the sums of the patch tensors), stable whether or not ComfyUI has the patches applied
    right now. Sums are taken in float64 on the CPU: a float32 sum depends on the thread count and the device (CPU vs
    GPU, offloaded or not) in the 7th digit, which made the same weights look different (e.g. a saved inversion loaded
    in another process)."""
    def total(t):
        t = t.detach().to("cpu", torch.float64)
        return f"{tuple(t.shape)}:{float(t.sum()):.6e}:{float(t.abs().sum()):.6e}"

    def patch_tensors(obj, depth=0):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif depth < 4 and isinstance(obj, (tuple, list)):
            for item in obj:
                yield from patch_tensors(item, depth + 1)
        elif depth < 4 and isinstance(getattr(obj, "weights", None), (tuple, list)):  # LoRAAdapter & co.
            yield from patch_tensors(obj.weights, depth + 1)

    h = hashlib.sha256()
    patches = getattr(model, "patches", {})
    sd = model.model.diffusion_model.state_dict()
    keys = [k for k in sorted(sd.keys()) if f"diffusion_model.{k}" not in patches]
    for key in keys[:: max(1, len(keys) // 16)]:
        h.update(key.encode())
        h.update(total(sd[key]).encode())
    for key in sorted(patches.keys()):
        h.update(str(key).encode())
        for p in patches[key]:
            h.update(f"{p[0]}:{p[2]}:".encode())
            h.update(":".join(total(t) for t in patch_tensors(p[1])).encode())
    return h.hexdigest()[:16]


def single_conditioning(conditioning, input_name: str):
    """The (tensor, options) pair of a one-entry CONDITIONING holding one prompt [1, tokens, C]."""
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
    return tensor, options
