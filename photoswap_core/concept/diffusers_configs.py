"""ComfyUI objects for a diffusers SD1/SD2-topology folder whose widths ComfyUI's shape detection does not know.

Why: ComfyUI recognises a diffusers UNet by comparing its shapes with fixed full-size configs (320 channels, context
768/1024/2048, ...), builds a fixed 768-wide 12-layer CLIP-L and a fixed 128-channel VAE. A small model of the same
topology (a test model, a toy model trained on a CPU, a distilled one) is refused although every class ComfyUI needs
supports it. Here every component is built from the folder's own `config.json` files, through ComfyUI's classes
(`supported_models.SD15`/`SD20`, `model_base.BaseModel`, `ModelPatcher`, `sd.CLIP` with `SD1ClipModel`, `sd.VAE`),
so sampling, patches and LoRAs work as on any ComfyUI model; nothing here runs a forward pass of its own.

Supported: UNet2DConditionModel with CrossAttn/plain down and up blocks, one transformer per attention block, a
cross-attention mid block, 4 latent channels, GroupNorm(32) and a constant head count or head size; CLIPTextModel;
AutoencoderKL with four levels (x8) and 4 latent channels. `prediction_type` "v_prediction" gives ComfyUI's SD20 class
(SD2.x v-models), anything else SD15. Anything else is a PhotoswapInputError naming the config entry.
"""
from __future__ import annotations

import functools
import os

import torch

from ..errors import PhotoswapInputError
from .safe_files import read_json_object

# diffusers config entries ComfyUI's SD UNet has no parameter for: the values it implies (first = diffusers' default)
UNET_FIXED = {
    "_class_name": ("UNet2DConditionModel",), "act_fn": ("silu",), "norm_num_groups": (32,), "norm_eps": (1e-5,),
    "in_channels": (4,), "out_channels": (4,), "flip_sin_to_cos": (True,), "freq_shift": (0,),
    "conv_in_kernel": (3,), "conv_out_kernel": (3,), "center_input_sample": (False,), "downsample_padding": (1,),
    "mid_block_scale_factor": (1,), "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "transformer_layers_per_block": (1,), "dual_cross_attention": (False,), "only_cross_attention": (False,),
    "class_embed_type": (None,), "num_class_embeds": (None,), "addition_embed_type": (None,),
    "encoder_hid_dim": (None,), "time_cond_proj_dim": (None,), "time_embedding_type": ("positional",),
    "timestep_post_act": (None,), "resnet_time_scale_shift": ("default",), "cross_attention_norm": (None,),
    "attention_type": ("default",), "time_embedding_dim": (None,), "time_embedding_act_fn": (None,),
    "projection_class_embeddings_input_dim": (None,), "addition_time_embed_dim": (None,),
    "class_embeddings_concat": (False,), "mid_block_only_cross_attention": (None, False),
    "reverse_transformer_layers_per_block": (None,), "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,), "encoder_hid_dim_type": (None,), "dropout": (0.0,),
}
UNET_DOWN_BLOCKS = {"CrossAttnDownBlock2D": 1, "DownBlock2D": 0}  # block type -> transformers per layer
UNET_UP_BLOCKS = {"CrossAttnUpBlock2D": 1, "UpBlock2D": 0}
TEXT_FIXED = {"model_type": ("clip_text_model",), "hidden_act": ("quick_gelu", "gelu"), "layer_norm_eps": (1e-5,),
              "max_position_embeddings": (77,)}
TEXT_MODEL_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "projection_dim",
                   "hidden_act")
VAE_FIXED = {"_class_name": ("AutoencoderKL",), "act_fn": ("silu",), "norm_num_groups": (32,), "in_channels": (3,),
             "out_channels": (3,), "latent_channels": (4,), "use_quant_conv": (True,), "use_post_quant_conv": (True,),
             "mid_block_add_attention": (True,)}
VAE_LEVELS = 4  # three downsamplings: 8 pixels per latent cell, as every SD1/SD2 VAE


def _bad(display: str, expected: str, fix: str) -> PhotoswapInputError:
    return PhotoswapInputError("diffusers_folder", expected, f"'{display}': {fix}")


def read_config(folder: str, part: str, display: str) -> dict:
    """`<folder>/<part>/config.json` as a dict."""
    try:
        return read_json_object(os.path.join(folder, part, "config.json"))
    except (OSError, ValueError) as exc:
        raise _bad(display, f"a {part}/config.json describing the {part}",
                   f"{part}/config.json is missing or unreadable ({exc}); copy the complete pipeline folder") from exc


def _same(value, allowed) -> bool:
    """Equal, and not True standing for 1 (or False for 0)."""
    return value == allowed and isinstance(value, bool) == isinstance(allowed, bool)


def _check_fixed(cfg: dict, fixed: dict, part: str, display: str) -> None:
    for key, allowed in fixed.items():
        value = cfg.get(key, allowed[0])
        values = value if isinstance(value, list) else [value]  # per-level lists must hold the value everywhere
        if not all(any(_same(v, a) for a in allowed) for v in values):
            raise _bad(display, f"an SD1/SD2-topology {part} ({key} = {' or '.join(map(repr, allowed))})",
                       f"{part}/config.json has {key} = {value!r}, which ComfyUI's SD classes cannot build; only "
                       "SD1.x/SD2.x-topology models of other widths load from their configs")


def _head_layout(cfg: dict, channels: list, display: str) -> tuple[int, int]:
    """(num_heads, num_head_channels), one of them -1, from diffusers' head counts (stored, for SD1/SD2 configs,
    under the misnamed `attention_head_dim`)."""
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    if isinstance(heads, int):
        return heads, -1
    heads = list(heads)
    if len(heads) == len(channels) and len(set(heads)) == 1:
        return heads[0], -1
    if len(heads) == len(channels) and all(c % h == 0 for c, h in zip(channels, heads)) \
            and len({c // h for c, h in zip(channels, heads)}) == 1:
        return -1, channels[0] // heads[0]
    raise _bad(display, "a UNet with the same number of attention heads, or the same head size, at every level",
               f"unet/config.json has {len(heads)} head counts {heads} for channels {channels}")


def unet_config_from_diffusers(cfg: dict, display: str) -> dict:
    """ComfyUI's UNetModel config for a diffusers SD1/SD2-topology UNet2DConditionModel config."""
    _check_fixed(cfg, UNET_FIXED, "UNet", display)
    channels, lpb = list(cfg.get("block_out_channels", ())), cfg.get("layers_per_block")
    down, up = list(cfg.get("down_block_types", ())), list(cfg.get("up_block_types", ()))
    if not channels or any(c % channels[0] for c in channels) or not isinstance(lpb, int) \
            or len(down) != len(channels) or len(up) != len(channels) \
            or not set(down) <= set(UNET_DOWN_BLOCKS) or not set(up) <= set(UNET_UP_BLOCKS) \
            or not isinstance(cfg.get("cross_attention_dim"), int):
        raise _bad(display, "an SD1/SD2-topology UNet (CrossAttn/plain down and up blocks, one per level; channels "
                            "multiples of the first; one layers_per_block; one cross_attention_dim)",
                   f"unet/config.json has block_out_channels {channels}, layers_per_block {lpb!r}, down blocks "
                   f"{down}, up blocks {up}, cross_attention_dim {cfg.get('cross_attention_dim')!r}")
    num_heads, num_head_channels = _head_layout(cfg, channels, display)
    up_depth = [UNET_UP_BLOCKS[t] for t in up for _ in range(lpb + 1)]
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": cfg.get("out_channels", 4),
        "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
        "in_channels": cfg.get("in_channels", 4), "model_channels": channels[0],
        "num_res_blocks": [lpb] * len(channels),
        "transformer_depth": [UNET_DOWN_BLOCKS[t] for t in down for _ in range(lpb)],
        "channel_mult": [c // channels[0] for c in channels], "transformer_depth_middle": 1,
        "use_linear_in_transformer": bool(cfg.get("use_linear_projection", False)),
        "context_dim": cfg["cross_attention_dim"],
        "transformer_depth_output": up_depth[::-1],  # ComfyUI builds the output blocks popping from the end
        "use_temporal_resblock": False, "use_temporal_attention": False,
        "num_heads": num_heads, "num_head_channels": num_head_channels,
    }


def _model_config(cfg: dict, v_prediction: bool, latent_scale: float | None, display: str):
    """ComfyUI's supported-model config (SD15, SD20 for v-prediction) carrying this UNet's own shape."""
    import comfy.supported_models as sm

    unet_config = unet_config_from_diffusers(cfg, display)
    config = (sm.SD20 if v_prediction else sm.SD15)(unet_config)
    # the class's unet_extra_config has overwritten the head layout with its full-size one: put this model's back
    config.unet_config.update(num_heads=unet_config["num_heads"], num_head_channels=unet_config["num_head_channels"])
    if cfg.get("upcast_attention"):
        config.unet_config["attn_precision"] = torch.float32
    if latent_scale is not None:
        config.latent_format.scale_factor = float(latent_scale)
    return config


def _check_keys(expected, given, part: str, display: str) -> None:
    """Config and weights describe the same model: every weight the config implies is given, and nothing else."""
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if missing or unexpected:
        raise _bad(display, f"{part} weights matching {part}/config.json",
                   f"{len(missing)} weight(s) the config implies are not in the file (e.g. {missing[:3]}) and "
                   f"{len(unexpected)} in the file do not belong to it (e.g. {unexpected[:3]}); save config and "
                   "weights from the same model")


def build_unet(unet_sd: dict, cfg: dict, prediction_type: str | None, latent_scale: float | None, display: str):
    """A ModelPatcher of ComfyUI's SD15 (SD20 for v-prediction) model class with this UNet's own config and weights;
    mirrors `comfy.sd.load_diffusion_model_state_dict` from the point where the config is known."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils

    v_prediction = prediction_type == "v_prediction"
    config = _model_config(cfg, v_prediction, latent_scale, display)
    mapping = {key: comfy_key for key, comfy_key in comfy.utils.unet_to_diffusers(config.unet_config).items()
               if key in unet_sd}  # the table also lists optional parts (ADM, class embeddings)
    _check_keys(mapping, unet_sd, "unet", display)
    comfy_sd = {comfy_key: unet_sd[key] for key, comfy_key in mapping.items()}
    load_device = mm.get_torch_device()
    unet_dtype = mm.unet_dtype(model_params=comfy.utils.calculate_parameters(comfy_sd),
                               supported_dtypes=list(config.supported_inference_dtypes),
                               weight_dtype=comfy.utils.weight_dtype(comfy_sd))
    config.set_inference_dtype(unet_dtype, mm.unet_manual_cast(unet_dtype, load_device,
                                                               config.supported_inference_dtypes))
    model_type = comfy.model_base.ModelType.V_PREDICTION if v_prediction else comfy.model_base.ModelType.EPS
    model = comfy.model_base.BaseModel(config, model_type=model_type).to(mm.unet_offload_device())
    _check_keys(model.diffusion_model.state_dict(), comfy_sd, "unet", display)
    model.load_model_weights(comfy_sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())


def text_model_config(cfg: dict, display: str) -> dict:
    """ComfyUI's `clip_l_model_config` (the CLIP text transformer's shape) from text_encoder/config.json."""
    _check_fixed(cfg, TEXT_FIXED, "text encoder", display)
    missing = [k for k in TEXT_MODEL_KEYS if k not in cfg]
    if missing:
        raise _bad(display, "a CLIPTextModel config", f"text_encoder/config.json lacks {missing}")
    return {k: cfg[k] for k in TEXT_MODEL_KEYS}


def _pad_token_id(tokenizer_dir: str | None) -> int | None:
    """The id the folder's tokenizer pads with when it is not the end token (SD2.x pads with "!" = 0), else None."""
    if tokenizer_dir is None:
        return None
    pad = None
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # transformers 5 writes only the latter
        try:
            pad = read_json_object(os.path.join(tokenizer_dir, name)).get("pad_token")
        except (OSError, ValueError):
            continue
        if pad is not None:
            break
    pad = pad.get("content") if isinstance(pad, dict) else pad
    if not isinstance(pad, str) or pad == "<|endoftext|>":
        return None
    try:
        return read_json_object(os.path.join(tokenizer_dir, "vocab.json")).get(pad)
    except (OSError, ValueError):
        return None


@functools.lru_cache(maxsize=None)
def tokenizer_class(width: int, pad_token: int | None = None):
    """ComfyUI's SD1 tokenizer (the real CLIP vocabulary) whose textual-inversion vectors are `width` wide."""
    import comfy.sd1_clip as sd1

    class FolderSD1Tokenizer(sd1.SD1Tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):  # noqa: B006 (ComfyUI's signature)
            super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
                             tokenizer=functools.partial(sd1.SDTokenizer, embedding_size=width, pad_token=pad_token))

    return FolderSD1Tokenizer


def build_clip(te_sd: dict, cfg: dict, tokenizer_dir: str | None, embedding_directory, display: str):
    """ComfyUI's CLIP (SD1ClipModel, clip_l) with this text encoder's own shape, weights and padding."""
    import comfy.sd
    import comfy.sd1_clip as sd1
    import comfy.supported_models_base as smb
    import comfy.utils

    options = {"clip_l_model_config": text_model_config(cfg, display)}
    target = smb.ClipTarget(tokenizer_class(cfg["hidden_size"], _pad_token_id(tokenizer_dir)), sd1.SD1ClipModel)
    clip = comfy.sd.CLIP(target=target, embedding_directory=embedding_directory, model_options=options,
                         parameters=comfy.utils.calculate_parameters(te_sd))
    missing, _unexpected = clip.load_sd(te_sd)
    missing = [k for k in missing if "text_projection" not in k and "logit_scale" not in k]
    if missing:
        raise _bad(display, "text-encoder weights matching text_encoder/config.json",
                   f"{len(missing)} weight(s) are not in the file (e.g. {missing[:3]}); save config and weights from "
                   "the same model")
    return clip


def vae_ddconfig(cfg: dict, display: str) -> dict:
    """ComfyUI's AutoencoderKL ddconfig from vae/config.json."""
    _check_fixed(cfg, VAE_FIXED, "VAE", display)
    channels, lpb = list(cfg.get("block_out_channels", ())), cfg.get("layers_per_block")
    if len(channels) != VAE_LEVELS or any(c % channels[0] for c in channels) or not isinstance(lpb, int) \
            or set(cfg.get("down_block_types", ())) != {"DownEncoderBlock2D"} \
            or set(cfg.get("up_block_types", ())) != {"UpDecoderBlock2D"}:
        raise _bad(display, f"an SD-topology VAE ({VAE_LEVELS} DownEncoder/UpDecoder levels, channels multiples of "
                            "the first, one layers_per_block)",
                   f"vae/config.json has block_out_channels {channels}, layers_per_block {lpb!r}, blocks "
                   f"{cfg.get('down_block_types')} / {cfg.get('up_block_types')}")
    return {"double_z": True, "z_channels": cfg.get("latent_channels", 4), "resolution": 256, "in_channels": 3,
            "out_ch": 3, "ch": channels[0], "ch_mult": [c // channels[0] for c in channels], "num_res_blocks": lpb,
            "attn_resolutions": [], "dropout": 0.0}


def build_vae(vae_sd: dict, cfg: dict, display: str):
    """ComfyUI's VAE with this AutoencoderKL's own shape and weights."""
    import comfy.diffusers_convert
    import comfy.sd

    ddconfig = vae_ddconfig(cfg, display)
    sd = comfy.diffusers_convert.convert_vae_state_dict(vae_sd)
    vae = comfy.sd.VAE(sd=dict(sd), config={"params": {"ddconfig": ddconfig, "embed_dim": ddconfig["z_channels"]}})
    missing = sorted(set(vae.first_stage_model.state_dict()) - set(sd))
    if missing:
        raise _bad(display, "VAE weights matching vae/config.json",
                   f"{len(missing)} weight(s) are not in the file (e.g. {missing[:3]}); save config and weights from "
                   "the same model")
    return vae


def load_from_configs(folder: str, display: str, unet_sd: dict, te_sd: dict, tokenizer_dir: str | None,
                      vae_sd: dict, prediction_type: str | None, embedding_directory):
    """(model, clip, vae) of an SD1/SD2-topology folder, every component built from its own config."""
    unet_cfg, text_cfg, vae_cfg = (read_config(folder, part, display) for part in ("unet", "text_encoder", "vae"))
    scale = vae_cfg.get("scaling_factor")
    model = build_unet(unet_sd, unet_cfg, prediction_type, scale, display)
    return model, build_clip(te_sd, text_cfg, tokenizer_dir, embedding_directory, display), \
        build_vae(vae_sd, vae_cfg, display)
