"""Where the swap acts: LocalBlend (official code, not in the paper) keeps the background by blending the target
latent toward the source outside the subject masks; regions (a region word's cross-attention map, an explicit MASK)
restrict a pair's swap and blend further. With several subject pairs each has its own masks and they are united.

Per step i of the target pass (`SwapMasks`):
- source maps of step i arrive first (`add_source`, from the trace or the lockstep record call), then the target
  call adds the target's (`add_target`): both summed over the steps so far, as the reference's attention store does;
- region of pair p: its region word's accumulated source map, 3×3 max-pooled, resized to the latent, divided by its
  max, above the threshold (1 where the pair has no region word), times the explicit region mask if one is given;
- after the step (`end_step`): LocalBlend mask M_p of pair p (from the blend start on; the reference's rule per
  pair), W_p = M_p·R_p, U = max_p W_p; target := source + U·(target − source) while LocalBlend runs, else
  lerp(source, target, R) where any region is set (exact at 0 and 1). One pair without a region is the reference.
A clip of F frames has every map, region and mask per frame (a leading frame dimension F).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import swap_rules


def _pooled(maps: torch.Tensor, latent_hw: tuple) -> torch.Tensor:
    """Rows [n, h_b, w_b] → 3×3 max-pooled (stride 1, pad 1), nearest-resized to the latent, divided by each row's
    spatial max: [n, 1, H, W]."""
    maps = maps.unsqueeze(1).float()
    maps = F.max_pool2d(maps, (3, 3), (1, 1), padding=(1, 1))
    maps = F.interpolate(maps, size=tuple(latent_hw))
    return maps / maps.amax(dim=(2, 3), keepdim=True)


def blend_mask(source_map: torch.Tensor, target_map: torch.Tensor, latent_hw: tuple, threshold: float) -> torch.Tensor:
    """Mask [F, 1, H, W] (bool) from the accumulated subject-column maps of both rows, each [F, h_b, w_b]: per row
    and frame the pooled, normalised map above the threshold; the target's mask is the union of both rows' masks."""
    frames = source_map.shape[0]
    mask = _pooled(torch.cat([source_map, target_map]), latent_hw) > threshold
    return (mask[:frames] | mask[frames:])


def apply_blend(x_source: torch.Tensor, x_target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """target := source + mask·(target − source), the reference's arithmetic (the source row is never changed)."""
    return x_source + mask.to(x_target.dtype) * (x_target - x_source)


def resize_region(mask: torch.Tensor, hw: tuple) -> torch.Tensor:
    """A region [1, 1, H, W] in [0, 1] at another size: area-averaged when smaller, nearest otherwise."""
    if tuple(mask.shape[-2:]) == tuple(hw):
        return mask
    if hw[0] <= mask.shape[-2] and hw[1] <= mask.shape[-1]:
        return F.adaptive_avg_pool2d(mask, tuple(hw))
    return F.interpolate(mask, size=tuple(hw), mode="nearest")


class SwapMasks:
    """Per-run mask state of a target pass (see the module docstring); tensors live on the compute device."""

    def __init__(self, prompts, windows, steps: int, device, region_mask: torch.Tensor | None = None):
        self.windows, self.steps = windows, steps
        subjects = prompts.subjects

        def cols(positions):
            return torch.tensor(positions, dtype=torch.int64, device=device)

        self._src_cols = [cols(s.source_positions) for s in subjects]
        self._tgt_cols = [cols(s.target_positions) for s in subjects]
        self._region_cols = [cols(s.region_positions) if s.region_word else None for s in subjects]
        self._concept_cols = [cols(s.concept_positions) for s in subjects]
        self.region_mask = region_mask  # explicit region [1, 1, h, w] at latent size, or None
        self.restricted = region_mask is not None or any(c is not None for c in self._region_cols)
        self.reset()

    def reset(self):
        n = len(self._src_cols)
        self.blend_source, self.blend_target, self.region_source = [None] * n, [None] * n, [None] * n
        self.blend_grid = None
        self.regions = None  # this step's per-pair regions [1, 1, H, W] (None: the pair has none)
        self._on_grid: dict = {}
        self.pair_masks = None  # the last step's W_p, [P, 1, H, W]

    @staticmethod
    def _add(total, value):
        return value if total is None else total + value

    def add_source(self, source_map: torch.Tensor | None) -> None:
        """The source's blend-layer maps [F, tokens_b, T] of this step (None: not recorded)."""
        if source_map is None:
            return
        if self.windows.local_blend:
            for p, c in enumerate(self._src_cols):
                self.blend_source[p] = self._add(self.blend_source[p], source_map[..., c].sum(-1))
        for p, c in enumerate(self._region_cols):
            if c is not None:
                self.region_source[p] = self._add(self.region_source[p], source_map[..., c].sum(-1))

    def add_target(self, maps: torch.Tensor, grid: tuple) -> None:
        """The target cond rows' (edited) maps [F, H, Nq, T] at a blend layer."""
        self.blend_grid = grid
        for p, c in enumerate(self._tgt_cols):
            self.blend_target[p] = self._add(self.blend_target[p], maps[..., c].sum(-1).mean(1).float())

    def begin_step(self, latent_hw: tuple, grid: tuple | None) -> None:
        """Regions for this step (after `add_source`), from the accumulated source maps on the blend grid."""
        self._on_grid = {}
        if not self.restricted:
            return
        regions = []
        for p, total in enumerate(self.region_source):
            region = None
            if total is not None and grid is not None:
                region = (_pooled(total.reshape(-1, *grid), latent_hw) > self.windows.blend_threshold).float()
            if self.region_mask is not None:
                region = self.region_mask if region is None else region * self.region_mask
            regions.append(region)
        self.regions = regions

    def query_weight(self, grid: tuple) -> torch.Tensor | None:
        """Where any pair's swap acts, at an attention layer's token grid: [F, Nq, 1] in [0, 1] (None: everywhere)."""
        if not self.restricted or self.regions is None:
            return None
        if grid not in self._on_grid:
            union = None
            for region in self.regions:
                if region is None:
                    return None  # a pair without a region acts everywhere
                union = region if union is None else torch.maximum(union, region)
            self._on_grid[grid] = resize_region(union, grid).flatten(1).unsqueeze(-1)
        return self._on_grid[grid]

    def allowed_columns(self, grid: tuple, columns: int) -> torch.Tensor | None:
        """Composition by parts: [F, 1, Nq, T] bool, False where a query outside pair p's region would attend to pair
        p's concept tokens (None when no pair has a region word)."""
        if self.regions is None or all(c is None for c in self._region_cols):
            return None
        key = ("columns", grid)
        if key not in self._on_grid:
            allowed = None
            for p, region in enumerate(self.regions):
                if self._region_cols[p] is None or region is None:
                    continue
                inside = resize_region(region, grid).flatten(1).unsqueeze(-1) >= 0.5  # [F, Nq, 1]
                if allowed is None:
                    allowed = torch.ones(*inside.shape[:2], columns, dtype=torch.bool, device=inside.device)
                blocked = torch.zeros(columns, dtype=torch.bool, device=inside.device)
                blocked[self._concept_cols[p]] = True
                allowed = allowed & (inside | ~blocked)
            self._on_grid[key] = None if allowed is None else allowed.unsqueeze(1)
        return self._on_grid[key]

    def end_step(self, step: int, x_source: torch.Tensor, x_target: torch.Tensor):
        """The target latent after LocalBlend and the regions, and the combined mask used (None: none)."""
        blending = swap_rules.blend_active(step, self.steps, self.windows) and self.blend_target[0] is not None
        if not blending and not self.restricted:
            return x_target, None
        hw = x_target.shape[-2:]
        masks = []
        for p in range(len(self._src_cols)):
            w = None
            if blending:
                h_b, w_b = self.blend_grid
                w = blend_mask(self.blend_source[p].reshape(-1, h_b, w_b), self.blend_target[p].reshape(-1, h_b, w_b),
                               hw, self.windows.blend_threshold).to(x_target.device)
            region = self.regions[p] if self.regions is not None else None
            if region is not None:
                w = region if w is None else w.float() * region
            masks.append(w)
        if any(m is None for m in masks):  # a pair acting everywhere (no blend yet, no region)
            return x_target, None
        union = masks[0]
        for m in masks[1:]:
            union = union | m if union.dtype == torch.bool and m.dtype == torch.bool else torch.maximum(
                union.float(), m.float())
        frames = x_target.shape[0]
        self.pair_masks = torch.cat([m.float().expand(frames, *m.shape[1:]) for m in masks])  # pair-major
        if blending:
            return apply_blend(x_source, x_target, union), union
        return torch.lerp(x_source, x_target, union.to(x_target.dtype)), union
