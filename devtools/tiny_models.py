"""Tiny SD-topology model sets built from ComfyUI's own classes, deterministic from a seed, float32.

They keep the real attention layout (SD1.x: 16 transformer blocks; SDXL: 70; SD2.x-like v-prediction: 16 with linear
projections and fp32 attention) and the real CLIP tokenizers, at a width that runs in well under a second per step on
a CPU. Random weights: only exact invariants and numerical agreement can be tested with them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .comfy_env import bootstrap


@dataclass
class TinyModelSet:
    family: str  # "sd15", "sdxl", "sd2v"
    model: object  # comfy.model_patcher.ModelPatcher
    clip: object  # comfy.sd.CLIP
    vae: object  # comfy.sd.VAE


TEXT_WIDTH = 32

SD15_TINY_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 32, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 2, 2], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": TEXT_WIDTH,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_resblock": False, "use_temporal_attention": False,
}

SD2V_TINY_UNET = dict(SD15_TINY_UNET, use_linear_in_transformer=True)

SDXL_TINY_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": TEXT_WIDTH + 6 * 256, "in_channels": 4, "model_channels": 32,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 2],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2 * TEXT_WIDTH,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}

TINY_TEXT_CONFIG = {"hidden_size": TEXT_WIDTH, "intermediate_size": 64, "num_attention_heads": 4,
                    "num_hidden_layers": 3, "projection_dim": TEXT_WIDTH}

TINY_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                     "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int, qk_gain: float = 1.5) -> None:
    """Deterministic random init (ComfyUI's ops leave weights uninitialised). Fan-in scaled normals; norms at 1/0;
    attention q/k projections amplified (×1.5) so maps are far from uniform, yet the network stays well conditioned
    (×3 makes it chaotic: a 1e-6 input change moves the output by 2e-2)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        leaf = name.rsplit(".", 1)[-1]
        if param.dim() >= 2:
            fan_in = param[0].numel()
            std = 1.0 / math.sqrt(fan_in)
            if "token_embedding" in name or "position_embedding" in name:
                std = 0.5
            values = torch.randn(param.shape, generator=gen) * std
            if ".to_q." in name or ".to_k." in name:
                values *= qk_gain
        elif leaf == "weight" and ("norm" in name or "ln_" in name):
            values = 1.0 + 0.05 * torch.randn(param.shape, generator=gen)
        else:
            values = 0.02 * torch.randn(param.shape, generator=gen)
        param.copy_(values.to(param.dtype))
    module.requires_grad_(False)
    for name, buf in module.named_buffers():
        if name.endswith("position_ids"):
            buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))


def _model_patcher(model_config, model_type):
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher

    model_config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.SDXL(model_config, model_type=model_type) if model_config.unet_config.get(
        "adm_in_channels") else comfy.model_base.BaseModel(model_config, model_type=model_type)
    return model, comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                                   offload_device=mm.unet_offload_device())


def _clip(target, seed: int):
    import comfy.sd

    options = {"dtype": torch.float32, "clip_l_model_config": TINY_TEXT_CONFIG, "clip_g_model_config": TINY_TEXT_CONFIG,
               "clip_h_model_config": TINY_TEXT_CONFIG}
    clip = comfy.sd.CLIP(target=target, model_options=options)
    randomize_(clip.cond_stage_model, seed)
    return clip


def _vae(seed: int):
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    params = {"ddconfig": TINY_VAE_DDCONFIG, "embed_dim": 4}
    module = AutoencoderKL(**params)
    randomize_(module, seed)
    vae = comfy.sd.VAE(sd=module.state_dict(), config={"params": params}, dtype=torch.float32)
    vae.first_stage_model.requires_grad_(False)
    return vae


def build_tiny(family: str = "sd15", seed: int = 0) -> TinyModelSet:
    """Build a tiny model set: "sd15" (ε), "sd2v" (v-prediction, SD2.x-like), "sdxl" (two encoders, pooled/ADM)."""
    bootstrap()
    import comfy.model_base
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models as sm
    import comfy.supported_models_base as smb
    import comfy.text_encoders.sd2_clip as sd2_clip

    if family == "sd15":
        from comfyui_photoswap.photoswap_core.concept.diffusers_configs import tokenizer_class

        config = sm.SD15(SD15_TINY_UNET)
        model_type = comfy.model_base.ModelType.EPS
        # the real SD1 tokenizer whose textual-inversion vectors have the tiny width (embeddings of 32 values)
        target = smb.ClipTarget(tokenizer_class(TEXT_WIDTH), comfy.sd1_clip.SD1ClipModel)
    elif family == "sd2v":
        config = sm.SD20(SD2V_TINY_UNET)
        model_type = comfy.model_base.ModelType.V_PREDICTION
        target = smb.ClipTarget(sd2_clip.SD2Tokenizer, sd2_clip.SD2ClipModel)
    elif family == "sdxl":
        config = sm.SDXL(SDXL_TINY_UNET)
        model_type = comfy.model_base.ModelType.EPS
        target = smb.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    else:
        raise ValueError(f"unknown tiny family {family!r}")
    config.unet_config["num_heads"] = -1
    config.unet_config["num_head_channels"] = 16
    model, patcher = _model_patcher(config, model_type)
    randomize_(model.diffusion_model, seed)
    with torch.no_grad():  # unit-scale predictions, so guidance and attention edits visibly move the latent
        model.diffusion_model.out[2].weight.mul_(40.0)
    clip = _clip(target, seed + 1)
    vae = _vae(seed + 2)
    return TinyModelSet(family=family, model=patcher, clip=clip, vae=vae)
