"""Load a small-width SD1-topology diffusers folder (the toy world's) into ComfyUI objects, from the folder's configs.

Why: ComfyUI 0.3.75 detects SD families from weight shapes and knows only full widths (UNet 320 channels, CLIP 768,
VAE 128), so the pack's Concept Loader refuses a small folder (toyworld/CORE_FINDING.md). This module is the change
that finding asks for, written self-contained so the lead can lift it into photoswap_core; until then the quality
benchmark and the tests call the Concept Loader first and fall back to `load_sd1_folder` when it refuses, and say so.
Dev-only: the pack's runtime never imports toyworld.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class ComfyModels:
    model: object  # comfy.model_patcher.ModelPatcher
    clip: object  # comfy.sd.CLIP
    vae: object  # comfy.sd.VAE
    how: str  # "concept loader" or "toyworld.comfy_load (config-driven)"


def comfy_unet_config(cfg: dict) -> dict:
    """ComfyUI's UNetModel config for a diffusers SD1-topology UNet2DConditionModel config."""
    lpb = cfg["layers_per_block"]
    depth = [1 if t.startswith("CrossAttn") else 0 for t in cfg["down_block_types"] for _ in range(lpb)]
    up_depth = [1 if t.startswith("CrossAttn") else 0 for t in cfg["up_block_types"] for _ in range(lpb + 1)]
    chans = list(cfg["block_out_channels"])
    heads = cfg["attention_head_dim"]  # diffusers' SD1 configs store the head COUNT under this name
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(chans)
    head_dims = {c // h for c, h in zip(chans, heads)}
    if len(head_dims) != 1:
        raise ValueError(f"toy UNet needs one head size at every level (got {sorted(head_dims)})")
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": cfg["out_channels"],
        "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
        "in_channels": cfg["in_channels"], "model_channels": chans[0], "num_res_blocks": [lpb] * len(chans),
        "transformer_depth": depth, "channel_mult": [c // chans[0] for c in chans], "transformer_depth_middle": 1,
        "use_linear_in_transformer": bool(cfg.get("use_linear_projection", False)),
        "context_dim": cfg["cross_attention_dim"], "transformer_depth_output": up_depth[::-1],
        "use_temporal_resblock": False, "use_temporal_attention": False,
        "num_heads": -1, "num_head_channels": head_dims.pop(),
    }


def _load_unet(folder: Path, dtype):
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm
    import comfy.utils
    from safetensors.torch import load_file

    unet_cfg = comfy_unet_config(json.loads((folder / "unet" / "config.json").read_text()))
    config = sm.SD15(unet_cfg)
    config.unet_config.update(num_heads=-1, num_head_channels=unet_cfg["num_head_channels"])
    config.set_inference_dtype(dtype, None)
    model = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS)
    diffusers_sd = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    mapping = comfy.utils.unet_to_diffusers(config.unet_config)
    comfy_sd = {ck: diffusers_sd[dk].to(dtype) for dk, ck in mapping.items() if dk in diffusers_sd}
    missing, _unexpected = model.diffusion_model.load_state_dict(comfy_sd, strict=False)
    if missing:
        raise RuntimeError(f"toy UNet keys not mapped: {missing[:5]}")
    model.diffusion_model.requires_grad_(False)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def tokenizer_class(width: int):
    """ComfyUI's SD1 tokenizer (the real SD1 vocabulary) with a textual-inversion vector width of `width`."""
    import functools

    import comfy.sd1_clip as sd1

    class ToyworldSD1Tokenizer(sd1.SD1Tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):  # noqa: B006  (ComfyUI's signature)
            super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
                             tokenizer=functools.partial(sd1.SDTokenizer, embedding_size=width))

    return ToyworldSD1Tokenizer


def _load_clip(folder: Path, dtype, embedding_directory=None):
    import comfy.sd
    import comfy.sd1_clip as sd1
    import comfy.supported_models_base as smb
    from safetensors.torch import load_file

    text_cfg = json.loads((folder / "text_encoder" / "config.json").read_text())
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "projection_dim",
            "hidden_act")
    options = {"dtype": dtype, "clip_l_model_config": {k: text_cfg[k] for k in keys}}
    clip = comfy.sd.CLIP(target=smb.ClipTarget(tokenizer_class(text_cfg["hidden_size"]), sd1.SD1ClipModel),
                         embedding_directory=embedding_directory, model_options=options)
    te_sd = {k: v.to(dtype) for k, v in load_file(folder / "text_encoder" / "model.safetensors").items()}
    missing, _ = clip.load_sd(te_sd)
    if [k for k in missing if "text_projection" not in k and "logit_scale" not in k]:
        raise RuntimeError(f"toy CLIP keys not loaded: {missing[:5]}")
    return clip


def vae_ddconfig(cfg: dict) -> dict:
    chans = cfg["block_out_channels"]
    return {"double_z": True, "z_channels": cfg["latent_channels"], "resolution": 256, "in_channels": 3,
            "out_ch": 3, "ch": chans[0], "ch_mult": [c // chans[0] for c in chans],
            "num_res_blocks": cfg["layers_per_block"], "attn_resolutions": [], "dropout": 0.0}


def _load_vae(folder: Path, dtype):
    import comfy.sd
    from safetensors.torch import load_file

    cfg = json.loads((folder / "vae" / "config.json").read_text())
    sd = {k: v.to(dtype) for k, v in load_file(folder / "vae" / "diffusion_pytorch_model.safetensors").items()}
    return comfy.sd.VAE(sd=sd, config={"params": {"ddconfig": vae_ddconfig(cfg), "embed_dim": cfg["latent_channels"]}},
                        dtype=dtype)


def load_sd1_folder(folder, dtype=torch.float32, embedding_directory=None) -> ComfyModels:
    """MODEL, CLIP, VAE of a small SD1 diffusers folder, built from its own configs (fp16 files → `dtype`)."""
    from devtools.comfy_env import bootstrap

    bootstrap()
    folder = Path(folder)
    return ComfyModels(_load_unet(folder, dtype), _load_clip(folder, dtype, embedding_directory),
                       _load_vae(folder, dtype), "toyworld.comfy_load (config-driven)")
