"""Load the shared parity model (`../shared/parity/tiny_sd`, diffusers format) into ComfyUI objects.

ComfyUI's shape-based detection does not know this width, so the UNet config is built from `unet/config.json`
(constant head dim 16 ⇒ num_heads=-1, num_head_channels=16) and the weights are mapped with ComfyUI's own
diffusers→ComfyUI key table. CLIP and VAE likewise from their configs.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .comfy_env import bootstrap
from .tiny_models import TinyModelSet


def _unet_config(cfg: dict) -> dict:
    depth = [1 if t.startswith("CrossAttn") else 0 for t in cfg["down_block_types"] for _ in range(cfg["layers_per_block"])]
    up_depth = [1 if t.startswith("CrossAttn") else 0 for t in cfg["up_block_types"] for _ in range(cfg["layers_per_block"] + 1)]
    channels = cfg["block_out_channels"]
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": cfg["out_channels"], "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": cfg["in_channels"], "model_channels": channels[0],
        "num_res_blocks": [cfg["layers_per_block"]] * len(channels), "transformer_depth": depth,
        "channel_mult": [c // channels[0] for c in channels], "transformer_depth_middle": 1,
        "use_linear_in_transformer": cfg["use_linear_projection"], "context_dim": cfg["cross_attention_dim"],
        "transformer_depth_output": up_depth[::-1],  # ComfyUI pops this list from the end "use_temporal_resblock": False, "use_temporal_attention": False,
        "num_heads": -1, "num_head_channels": channels[0] // cfg["attention_head_dim"][0],
    }


def load_parity_model(folder: Path) -> TinyModelSet:
    bootstrap()
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models as sm
    import comfy.supported_models_base as smb
    import comfy.utils
    from safetensors.torch import load_file

    folder = Path(folder)
    unet_cfg = _unet_config(json.loads((folder / "unet" / "config.json").read_text()))
    config = sm.SD15(unet_cfg)
    config.unet_config.update(num_heads=unet_cfg["num_heads"], num_head_channels=unet_cfg["num_head_channels"])
    config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS)
    diffusers_sd = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    mapping = comfy.utils.unet_to_diffusers(config.unet_config)
    comfy_sd = {comfy_key: diffusers_sd[d_key] for d_key, comfy_key in mapping.items() if d_key in diffusers_sd}
    missing, unexpected = model.diffusion_model.load_state_dict(comfy_sd, strict=False)
    if missing:
        raise RuntimeError(f"parity UNet keys not mapped: {missing[:5]}")
    model.diffusion_model.requires_grad_(False)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())

    text_cfg = json.loads((folder / "text_encoder" / "config.json").read_text())
    options = {"dtype": torch.float32, "clip_l_model_config": {
        k: text_cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                                 "projection_dim", "hidden_act")}}
    clip = comfy.sd.CLIP(target=smb.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel),
                         model_options=options)
    te_sd = load_file(folder / "text_encoder" / "model.safetensors")
    missing, _ = clip.load_sd(te_sd)
    if [k for k in missing if "text_projection" not in k and "logit_scale" not in k]:
        raise RuntimeError(f"parity CLIP keys not loaded: {missing[:5]}")
    clip.cond_stage_model.requires_grad_(False)

    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    chans = vae_cfg["block_out_channels"]
    ddconfig = {"double_z": True, "z_channels": vae_cfg["latent_channels"], "resolution": 256, "in_channels": 3,
                "out_ch": 3, "ch": chans[0], "ch_mult": [c // chans[0] for c in chans],
                "num_res_blocks": vae_cfg["layers_per_block"], "attn_resolutions": [], "dropout": 0.0}
    vae = comfy.sd.VAE(sd=load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"),
                       config={"params": {"ddconfig": ddconfig, "embed_dim": vae_cfg["latent_channels"]}},
                       dtype=torch.float32)
    vae.first_stage_model.requires_grad_(False)
    return TinyModelSet(family="sd15", model=patcher, clip=clip, vae=vae)
