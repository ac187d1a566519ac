"""The architecture adapter: the only place that knows a model family (docs/architecture.md).

`inspect_model(model)` returns the `Architecture` of a ComfyUI MODEL or refuses it, naming it; `from_info(info)`
rebuilds one from a saved inversion's `ModelInfo`. Families are tried in `ARCHITECTURES` order.
"""
from __future__ import annotations

from ..errors import PhotoswapInputError
from .base import Architecture, LatentFormat, ModelInfo, Schedule, TextContext, single_conditioning
from .flux import FluxDiT
from .sd_unet import SDUNet

ARCHITECTURES = (SDUNet, FluxDiT)

__all__ = ["ARCHITECTURES", "Architecture", "LatentFormat", "ModelInfo", "Schedule", "TextContext", "from_info",
           "inspect_model", "single_conditioning"]


def inspect_model(model) -> Architecture:
    """The adapter of a ComfyUI MODEL (ModelPatcher); a clear error for families Photoswap does not support."""
    for architecture in ARCHITECTURES:
        found = architecture.detect(model)
        if found is not None:
            return found
    base = getattr(model, "model", None)
    config = getattr(base, "model_config", None)
    name = type(config).__name__ if config is not None else type(base).__name__
    raise PhotoswapInputError(
        "model", f"an SD1.x, SD2.x, SDXL or Flux model (got a {name} model)",
        f"{name} is not supported by Photoswap yet (it needs a UNet with cross-attention and a discrete DDIM "
        "schedule, or Flux's joint attention); load an SD1.x, SD2.x, SDXL or Flux (dev/schnell) model")


def from_info(info: ModelInfo) -> Architecture:
    """The adapter described by a saved `ModelInfo`."""
    for architecture in ARCHITECTURES:
        if info.family in architecture.families():
            return architecture.from_info(info)
    raise PhotoswapInputError("inversion_file", f"an inversion of a supported model family (got {info.family!r})",
                              "re-run the inversion with an SD1.x, SD2.x, SDXL or Flux model")
