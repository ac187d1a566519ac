"""Attention previews for choosing words and windows: the subject/concept token cross-attention maps and the top
SVD component of the self-attention maps (paper Fig. 3), at the LocalBlend level (level 2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import swap_rules
from .attention_patch import explicit_cross_maps, transformer_layers
from .model_adapter import DirectEvaluator


def _normalise(m: torch.Tensor) -> torch.Tensor:
    m = m.float()
    m = m - m.min()
    return m / m.max().clamp_min(1e-12)


class _Capture:
    def __init__(self, columns):
        self.columns = columns
        self.cross = []
        self.self_maps = []

    def patch(self, kind):
        from comfy.ldm.modules.attention import optimized_attention

        def fn(q, k, v, extra):
            level = swap_rules.layer_level(extra)
            heads = extra["n_heads"]
            if swap_rules.blend_layer(level, extra["block"][0]):
                grid = tuple(extra["activations_shape"][2:])
                maps = explicit_cross_maps(q[-1:], k[-1:], heads, torch.float32)  # last row: the cond row
                if kind == "attn2":
                    self.cross.append((maps[..., self.columns].sum(-1).mean(1)[0], grid))
                else:
                    self.self_maps.append((maps.mean(1)[0], grid))
            return optimized_attention(q, k, v, heads, attn_precision=extra.get("attn_precision"))
        return fn


def _maps_at(model, trace, step, conditioning, columns):
    capture = _Capture(columns)
    patched = model.clone()
    for layer in transformer_layers(patched.model.diffusion_model):
        for kind in ("attn1", "attn2"):
            patched.set_model_patch_replace(capture.patch(kind), kind, *layer)
    evaluator = DirectEvaluator(patched, trace.latent_shape)
    kwargs = evaluator.model_kwargs(conditioning[0])
    x = trace.trajectory[step].to(evaluator.device)
    with torch.no_grad():
        evaluator.eps(x, float(trace.schedule.sigmas[step]), kwargs["c_crossattn"], kwargs.get("y"))
    return capture


def attention_previews(model, trace, prompts, target_positive, step_fraction: float, image_hw: tuple,
                       blend_mask: torch.Tensor | None = None) -> torch.Tensor:
    """IMAGE batch [4, H, W, 3]: source subject map, target concept map (on the source layout), LocalBlend mask,
    top SVD component of the source self-attention maps; each normalised to [0, 1]."""
    step = min(trace.steps - 1, max(0, int(step_fraction * trace.steps)))
    src = _maps_at(model, trace, step, trace.source_conditioning, list(prompts.source_subject_positions))
    tgt = _maps_at(model, trace, step, target_positive, list(prompts.target_subject_positions))
    h, w = src.cross[0][1]
    src_map = torch.stack([m for m, _ in src.cross]).mean(0).reshape(h, w)
    tgt_map = torch.stack([m for m, _ in tgt.cross]).mean(0).reshape(h, w)
    self_map = torch.stack([m for m, _ in src.self_maps]).mean(0)  # [tokens, tokens]
    u, _, _ = torch.linalg.svd(self_map.float())
    component = u[:, 0].reshape(h, w)
    component = component * torch.sign(component.sum())  # SVD sign is arbitrary
    if blend_mask is None:
        blend = torch.ones(h, w)
    else:
        blend = blend_mask.float().reshape(-1, *blend_mask.shape[-2:])[0]
    panels = []
    for panel in (src_map, tgt_map, blend, component):
        panel = _normalise(panel.cpu())[None, None]
        panel = F.interpolate(panel, size=tuple(image_hw), mode="nearest")[0, 0]
        panels.append(panel.unsqueeze(-1).expand(*image_hw, 3))
    return torch.stack(panels)
