"""A tiny ControlNet built from ComfyUI's own classes, matching the tiny SD1.x UNet of `devtools.tiny_models`.

`comfy.cldm.cldm.ControlNet` with the tiny UNet's config (hint_channels 3), deterministic random weights — including
the "zero" convolutions, which are random here so that the ControlNet visibly changes what it is applied to — wrapped
in `comfy.controlnet.ControlNet` (a CONTROL_NET object, as `ControlNetLoader` returns), float32 on the CPU.
"""
from __future__ import annotations

import torch

from .comfy_env import bootstrap
from .tiny_models import SD15_TINY_UNET, randomize_


def build_tiny_controlnet(seed: int = 7, zero_conv_gain: float = 1.0, unet_config: dict | None = None):
    """CONTROL_NET for the tiny SD1.x model (`unet_config` defaults to SD15_TINY_UNET).

    `zero_conv_gain` scales the zero convolutions' weights (1.0: the residuals are about as large as the UNet's own
    activations, a strong but finite effect)."""
    bootstrap()
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management as mm
    import comfy.ops

    cfg = dict(unet_config or SD15_TINY_UNET)
    for key in ("out_channels", "use_temporal_resblock", "use_temporal_attention", "transformer_depth_output"):
        cfg.pop(key, None)
    cfg["num_heads"] = -1
    cfg["num_head_channels"] = 16
    cfg["hint_channels"] = 3
    cfg["transformer_depth"] = list(cfg["transformer_depth"])
    module = comfy.cldm.cldm.ControlNet(dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init,
                                        **cfg)
    randomize_(module, seed, qk_gain=1.0)
    with torch.no_grad():
        for conv in list(module.zero_convs) + [module.middle_block_out]:
            conv[0].weight.mul_(zero_conv_gain)
    module.eval()
    return comfy.controlnet.ControlNet(module, load_device=mm.get_torch_device(), manual_cast_dtype=None)


def hint_image(height_px: int, width_px: int, seed: int = 3) -> torch.Tensor:
    """An IMAGE [1, H, W, 3] in [0, 1]: a bright rectangle on a dark background plus a little noise."""
    gen = torch.Generator().manual_seed(seed)
    image = 0.1 * torch.rand(1, height_px, width_px, 3, generator=gen)
    image[:, height_px // 4: 3 * height_px // 4, width_px // 3: 2 * width_px // 3, :] += 0.8
    return image.clamp(0, 1)
