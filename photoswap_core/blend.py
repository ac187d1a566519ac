"""LocalBlend (official code, not in the paper): keep the background by blending the target latent toward the source
outside the union of the source-subject and target-subject cross-attention masks."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def blend_mask(source_map: torch.Tensor, target_map: torch.Tensor, latent_hw: tuple, threshold: float) -> torch.Tensor:
    """Mask [1, 1, H, W] (bool) from the accumulated subject-column maps of both rows, each [h_b, w_b].

    Per row: 3×3 max-pool (stride 1, pad 1), nearest resize to the latent, divide by the row's spatial max,
    threshold; the target's mask is the union of both rows' masks.
    """
    maps = torch.stack([source_map, target_map]).unsqueeze(1).float()
    maps = F.max_pool2d(maps, (3, 3), (1, 1), padding=(1, 1))
    maps = F.interpolate(maps, size=tuple(latent_hw))
    maps = maps / maps.amax(dim=(2, 3), keepdim=True)
    mask = maps > threshold
    return (mask[:1] | mask[1:2])


def apply_blend(x_source: torch.Tensor, x_target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """target := source + mask·(target − source), the reference's arithmetic (the source row is never changed)."""
    return x_source + mask.to(x_target.dtype) * (x_target - x_source)
