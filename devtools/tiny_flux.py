"""A tiny Flux (Flux-dev topology) built from ComfyUI's own classes, float32, CPU, deterministic from a seed.

Why: the Flux adapter of issue #17 needs exact invariants (identical prompts, all windows zero, trace == lockstep)
on a model that runs in well under a second per step; real Flux weights cannot be had here. What is real:
`comfy.supported_models.Flux` / `comfy.model_base.Flux` (ModelType.FLUX -> ModelSamplingFlux + CONST, Flux latent
format with 16 channels, 2x2 patchify, RoPE, double/single blocks, guidance embedding), ComfyUI's `FluxClipModel`
with the REAL T5 SentencePiece tokenizer and the REAL CLIP-L tokenizer (tiny T5/CLIP-L widths through ComfyUI's own
`t5xxl_model_config` / `clip_l_model_config` overrides), and a VAE with 16 latent channels and x8 downscale.

One stand-in: the tiny VAE is an `AutoencoderKL` (with 1x1 quant convs) because `comfy.sd.VAE(config=...)` only builds
that class; the real Flux VAE file is an `AutoencodingEngine` without quant convs (see devtools/flux_checkpoints.py,
which loads a real-layout one). The latent contract (16 channels, x8, Flux scale/shift applied by the MODEL's
latent_format) is the same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .comfy_env import bootstrap

T5_WIDTH = 32  # tiny T5 d_model = Flux context_in_dim
CLIP_WIDTH = 32  # tiny CLIP-L hidden = Flux vec_in_dim (the pooled vector)

TINY_FLUX_UNET = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": CLIP_WIDTH,
    "context_in_dim": T5_WIDTH, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 4, "depth": 2,
    "depth_single_blocks": 3, "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2, "qkv_bias": True,
    "guidance_embed": True,
}
TINY_T5_CONFIG = {"d_model": T5_WIDTH, "d_ff": 64, "d_kv": 8, "num_heads": 4, "num_layers": 2,
                  "num_decoder_layers": 2}
TINY_CLIP_L_CONFIG = {"hidden_size": CLIP_WIDTH, "intermediate_size": 64, "num_attention_heads": 4,
                      "num_hidden_layers": 2, "projection_dim": CLIP_WIDTH}
TINY_FLUX_VAE_DDCONFIG = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3,
                          "ch": 32, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_resolutions": [],
                          "dropout": 0.0}


@dataclass
class TinyFlux:
    model: object  # comfy.model_patcher.ModelPatcher around comfy.model_base.Flux
    clip: object  # comfy.sd.CLIP holding comfy.text_encoders.flux.FluxClipModel
    vae: object  # comfy.sd.VAE, 16 latent channels
    family: str = "flux"


@torch.no_grad()
def randomize_flux_(module: torch.nn.Module, seed: int, qk_gain: float = 1.5) -> None:
    """Deterministic init (ComfyUI's ops leave weights as torch.empty). Fan-in normals for matrices; RMSNorm/LayerNorm
    scales near 1 (a 0.02 scale would zero q/k and make every attention map uniform); small biases. The q/k third of
    each fused qkv projection is amplified so joint-attention maps are far from uniform."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        leaf = name.rsplit(".", 1)[-1]
        if param.dim() >= 2:
            embedding = name.endswith("shared.weight") or "token_embedding" in name or "position_embedding" in name
            std = 0.5 if embedding else 1.0 / math.sqrt(param[0].numel())
            values = torch.randn(param.shape, generator=gen) * std
            if name.endswith("qkv.weight") or name.endswith("linear1.weight"):
                hidden = param.shape[1]
                values[: 2 * hidden] *= qk_gain
        elif leaf == "scale" or (leaf == "weight" and ("norm" in name or "ln_" in name or "layer_norm" in name)):
            values = 1.0 + 0.05 * torch.randn(param.shape, generator=gen)
        else:
            values = 0.02 * torch.randn(param.shape, generator=gen)
        param.copy_(values.to(param.dtype))
    module.requires_grad_(False)
    for name, buf in module.named_buffers():
        if name.endswith("position_ids"):
            buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))


def _model(seed: int, unet_config: dict):
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm

    config = sm.Flux(dict(unet_config))
    config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.Flux(config)  # model_type=ModelType.FLUX
    randomize_flux_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                           offload_device=mm.unet_offload_device())


def _clip(seed: int):
    import comfy.sd
    import comfy.supported_models_base as smb
    import comfy.text_encoders.flux as flux_te

    options = {"dtype": torch.float32, "t5xxl_model_config": dict(TINY_T5_CONFIG),
               "clip_l_model_config": dict(TINY_CLIP_L_CONFIG)}
    target = smb.ClipTarget(flux_te.FluxTokenizer, flux_te.flux_clip())
    clip = comfy.sd.CLIP(target=target, model_options=options)
    randomize_flux_(clip.cond_stage_model, seed)
    return clip


def _vae(seed: int):
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    params = {"ddconfig": dict(TINY_FLUX_VAE_DDCONFIG), "embed_dim": 16}
    module = AutoencoderKL(**params)
    randomize_flux_(module, seed)
    vae = comfy.sd.VAE(sd=module.state_dict(), config={"params": params}, dtype=torch.float32)
    vae.latent_channels = 16  # the config path keeps the SD default of 4; EmptyLatent-style helpers read this
    vae.first_stage_model.requires_grad_(False)
    return vae


def build_tiny_flux(seed: int = 0, unet_config: dict | None = None) -> TinyFlux:
    """Tiny Flux-dev: 2 double + 3 single blocks, hidden 64, 4 heads (head dim 16, RoPE axes [4, 6, 6]), guidance
    embedding on, T5 width 32 (2 layers), CLIP-L width 32 (2 layers), 16-channel VAE."""
    bootstrap()
    return TinyFlux(model=_model(seed, unet_config or TINY_FLUX_UNET), clip=_clip(seed + 1), vae=_vae(seed + 2))


# ------------------------------------------------------------------------------------------------ conditioning

def encode_flux(clip, text: str, guidance: float | None = 3.5):
    """CONDITIONING as CLIPTextEncode + FluxGuidance build it: [[t5_tokens [1, L, C], {"pooled_output": clip_l pooled,
    "guidance": g}]]. guidance=None leaves it out (model_base.Flux.extra_conds then uses 3.5)."""
    import node_helpers

    tokens = clip.tokenize(text)
    cond = clip.encode_from_tokens_scheduled(tokens)
    if guidance is not None:
        cond = node_helpers.conditioning_set_values(cond, {"guidance": guidance})
    return cond


def t5_word_pieces(clip, text: str):
    """[(token_id, word_id, piece)] of the T5 stream without padding, from ComfyUI's own tokenizer
    (`clip.tokenize(text, return_word_ids=True)["t5xxl"]`, entries (id, weight, word_id); word_id 0 = end/pad) and
    the SentencePiece pieces ("▁" starts a word)."""
    t5 = clip.tokenizer.t5xxl
    entries = [e for batch in clip.tokenize(text, return_word_ids=True)["t5xxl"] for e in batch]
    ids = [int(e[0]) for e in entries]
    pieces = t5.tokenizer.convert_ids_to_tokens(ids)
    return [(tid, int(e[2]), p) for tid, e, p in zip(ids, entries, pieces) if not (tid == 0 and e[2] == 0)]


# ------------------------------------------------------------------------------------------------ sampling

def flux_sigmas(model, steps: int, scheduler: str = "simple", denoise: float = 1.0):
    """ComfyUI's Flux sigmas exactly as BasicScheduler computes them (from the MODEL's model_sampling, so a
    ModelSamplingFlux patch with another shift is honoured)."""
    import comfy.samplers

    sampling = model.get_model_object("model_sampling")
    if denoise >= 1.0:
        return comfy.samplers.calculate_sigmas(sampling, scheduler, steps).cpu()
    total = int(steps / denoise)
    return comfy.samplers.calculate_sigmas(sampling, scheduler, total).cpu()[-(steps + 1):]


def sample_flux(model, positive, latent: torch.Tensor, steps: int = 4, seed: int = 0, sampler: str = "euler",
                scheduler: str = "simple", sigmas: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                negative=None, cfg: float = 1.0, add_noise: bool = True) -> torch.Tensor:
    """Plain Flux sampling through ComfyUI's own path (`comfy.sample.sample_custom`, what SamplerCustom runs):
    `latent` is a LATENT "samples" tensor (unscaled VAE space, [B, 16, H/8, W/8]); the result is in the same space.
    cfg 1.0 (Flux-dev's distilled guidance comes from `positive`'s "guidance"); the uncond is then never evaluated."""
    import comfy.sample
    import comfy.samplers

    if sigmas is None:
        sigmas = flux_sigmas(model, steps, scheduler)
    if noise is None:
        noise = comfy.sample.prepare_noise(latent, seed) if add_noise else torch.zeros_like(latent)
    if negative is None:
        negative = [[torch.zeros_like(c[0]), {k: v for k, v in c[1].items()}] for c in positive]
    return comfy.sample.sample_custom(model, noise, cfg, comfy.samplers.sampler_object(sampler), sigmas, positive,
                                      negative, latent, noise_mask=None, callback=None, disable_pbar=True, seed=seed)


# ------------------------------------------------------------------------------------------------ probes

class AttentionProbe:
    """An `optimized_attention_override`: records each joint-attention call (shapes, args/kwargs, the
    transformer_options seen) and calls the original function unchanged. `__deepcopy__` returns self so that
    ModelPatcher.clone() (which deep-copies model_options in 0.3.75) keeps one probe."""

    def __init__(self):
        self.calls: list[dict] = []

    def __deepcopy__(self, memo):
        return self

    def __call__(self, func, *args, **kwargs):
        q, k, v = args[:3]
        opts = kwargs.get("transformer_options") or {}
        self.calls.append({
            "func": getattr(func, "__name__", repr(func)), "n_args": len(args),
            "heads": args[3] if len(args) > 3 else kwargs.get("heads"),
            "q": tuple(q.shape), "k": tuple(k.shape), "v": tuple(v.shape),
            "kwargs": sorted(kwargs), "skip_reshape": kwargs.get("skip_reshape"), "mask": kwargs.get("mask"),
            "block_type": opts.get("block_type"), "block_index": opts.get("block_index"),
            "total_blocks": opts.get("total_blocks"), "cond_or_uncond": list(opts.get("cond_or_uncond", [])),
            "sigmas": opts["sigmas"].clone() if "sigmas" in opts else None, "opt_keys": sorted(opts),
        })
        out = func(*args, **kwargs)
        self.calls[-1]["out"] = tuple(out.shape)
        return out


def with_attention_override(model, override):
    """A clone of `model` whose Flux attention calls go through `override(func, *args, **kwargs)`; the input
    ModelPatcher and its model_options are not touched."""
    m = model.clone()
    opts = dict(m.model_options.get("transformer_options", {}))
    opts["optimized_attention_override"] = override
    m.model_options["transformer_options"] = opts
    return m


class BlockProbe:
    """A `patches_replace["dit"]` block patch that records the args dict it receives and calls the original block."""

    def __init__(self):
        self.calls: list[dict] = []

    def __deepcopy__(self, memo):
        return self

    def __call__(self, args, extra):
        self.calls.append({"keys": sorted(args), "extra": sorted(extra),
                           "shapes": {k: tuple(v.shape) for k, v in args.items() if torch.is_tensor(v)},
                           "block_type": args["transformer_options"].get("block_type"),
                           "block_index": args["transformer_options"].get("block_index")})
        out = extra["original_block"](args)
        self.calls[-1]["out"] = sorted(out)
        return out


def with_block_probes(model, probe, double=(), single=()):
    m = model.clone()
    for i in double:
        m.set_model_patch_replace(probe, "dit", "double_block", i)
    for i in single:
        m.set_model_patch_replace(probe, "dit", "single_block", i)
    return m


# ------------------------------------------------------------------------------------------------ LoRA fixtures

FLUX_LORA_TARGETS = {  # format -> [(lora key, ComfyUI weight it patches, (out_slice or None))]
    "kohya": [("lora_unet_double_blocks_0_img_attn_qkv", "double_blocks.0.img_attn.qkv.weight", None),
              ("lora_unet_single_blocks_0_linear1", "single_blocks.0.linear1.weight", None)],
    "diffusers": [("transformer.transformer_blocks.0.attn.to_q", "double_blocks.0.img_attn.qkv.weight", 0),
                  ("transformer.single_transformer_blocks.0.proj_out", "single_blocks.0.linear2.weight", None)],
}


def flux_lora_state_dict(model, fmt: str = "kohya", rank: int = 4, seed: int = 0, scale: float = 0.5) -> dict:
    """A random LoRA for `model` in a format people train: "kohya" (sd-scripts / ai-toolkit's kohya option:
    lora_unet_<BFL name>.lora_down/lora_up/alpha) or "diffusers" (diffusers / ai-toolkit / peft:
    transformer.<diffusers name>.lora_A/lora_B). diffusers to_q/to_k/to_v patch thirds of the fused qkv."""
    shapes = {k: tuple(v.shape) for k, v in model.model.diffusion_model.state_dict().items()}
    return flux_lora_for_shapes(shapes, fmt, rank, seed, scale)


def flux_lora_for_shapes(shapes: dict, fmt: str = "kohya", rank: int = 4, seed: int = 0, scale: float = 0.5) -> dict:
    """flux_lora_state_dict from the diffusion model's {BFL key: shape} alone (e.g. the meta layout of a full-width
    file, devtools.flux_checkpoints._meta_layout), without loading the model."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, target, third in FLUX_LORA_TARGETS[fmt]:
        rows, cols = shapes[target]
        if third is not None:
            rows = cols  # one of q/k/v: hidden x hidden
        down = torch.randn(rank, cols, generator=gen) * scale / math.sqrt(cols)
        up = torch.randn(rows, rank, generator=gen) * scale
        if fmt == "kohya":
            out.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                        f"{key}.alpha": torch.tensor(float(rank))})
        else:
            out.update({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up})
    return out
