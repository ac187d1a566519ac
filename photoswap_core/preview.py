"""Attention previews for choosing words and windows: the subject/concept token cross-attention maps and the top
SVD component of the self-attention maps (paper Fig. 3), at the LocalBlend layers the architecture adapter names."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .attention_patch import explicit_cross_maps
from .evaluator import DirectEvaluator
from .joint_attention import row_lse, text_block
from .swap_sampler import check_trace


def _normalise(m: torch.Tensor) -> torch.Tensor:
    m = m.float()
    m = m - m.min()
    return m / m.max().clamp_min(1e-12)


class _Capture:
    """Replace patches that keep the cond row's maps at the blend layers and compute plain attention."""

    def __init__(self, arch, column_sets):
        self.arch = arch
        self.column_sets = column_sets  # one list of token positions per subject pair
        self.cross = []  # per blend-layer call: ([per pair: subject-column map], grid)
        self.self_maps = []

    def joint(self, layer, q, k, v, extra):
        """Joint attention (MM-DiT): the cond row's image→text columns and image→image map at the blend sites."""
        if layer in self.arch.sites(None)["blend"]:
            l_txt, img, grid = self.arch.joint_layout(extra)
            q_img, k_row = q[-1:, :, img], k[-1:]
            lse = row_lse(q_img, k_row)
            maps = text_block(q_img, k_row[:, :, :l_txt], lse)
            self.cross.append(([maps[..., c].sum(-1).mean(1)[0] for c in self.column_sets], grid))
            self_map = text_block(q_img, k_row[:, :, img], lse)  # the image→image block, same normalisation
            self.self_maps.append((self_map.mean(1)[0], grid))
        return self.arch.attention(q, k, v, extra)

    def patch(self, role, layer, prior):
        if role == "joint":
            return functools.partial(self.joint, layer)

        def fn(q, k, v, extra):
            heads = extra["n_heads"]
            if self.arch.blend_layer(self.arch.layer_level(extra), extra):
                grid = self.arch.token_grid(extra)
                maps = explicit_cross_maps(q[-1:], k[-1:], heads, torch.float32)  # last row: the cond row
                if role == "cross":
                    self.cross.append(([maps[..., c].sum(-1).mean(1)[0] for c in self.column_sets], grid))
                else:
                    self.self_maps.append((maps.mean(1)[0], grid))
            return self.arch.attention(q, k, v, extra)
        return fn


def _maps_at(model, arch, trace, step, conditioning, column_sets):
    capture = _Capture(arch, column_sets)
    patched = model.clone()
    arch.install_attention_patches(patched, capture.patch)
    import comfy.patcher_extension

    # the clone's wrappers too (ComfyUI's sampler adds them; a direct call must): Flux's token counter is one
    options = dict(patched.model_options.get("transformer_options", {}))
    options["wrappers"] = comfy.patcher_extension.copy_nested_dicts(patched.wrappers)
    evaluator = DirectEvaluator(patched, trace.latent_shape, transformer_options=options, arch=arch)
    kwargs = evaluator.model_kwargs(conditioning[0])
    x = trace.trajectory[step].to(evaluator.device)
    with torch.no_grad():
        evaluator.eps(x, float(trace.schedule.sigmas[step]), **kwargs)
    return capture


def attention_previews(model, trace, prompts, target_positive, step_fraction: float,
                       blend_mask: torch.Tensor | None = None) -> torch.Tensor:
    """IMAGE batch [2P + 2, H, W, 3] at image size: per subject pair its source subject map and target concept map
    (on the source layout), then the blend mask and the top SVD component of the source self-attention maps; each
    normalised to [0, 1]. A clip's previews are of its first frame."""
    arch = check_trace(model, trace)
    trace = trace.select_frames((0,))
    image_hw = arch.latent.pixels(trace.latent_shape[-2:])
    step = min(trace.steps - 1, max(0, int(step_fraction * trace.steps)))
    maps_at = functools.partial(_maps_at, model, arch, trace, step)
    src = maps_at(trace.source_conditioning, [list(s.source_positions) for s in prompts.subjects])
    tgt = maps_at(target_positive, [list(s.target_positions) for s in prompts.subjects])
    h, w = src.cross[0][1]
    pair_maps = []
    for p in range(len(prompts.subjects)):
        for capture in (src, tgt):
            pair_maps.append(torch.stack([maps[p] for maps, _ in capture.cross]).mean(0).reshape(h, w))
    self_map = torch.stack([m for m, _ in src.self_maps]).mean(0)  # [tokens, tokens]
    u, _, _ = torch.linalg.svd(self_map.float())
    component = u[:, 0].reshape(h, w)
    component = component * torch.sign(component.sum())  # SVD sign is arbitrary
    if blend_mask is None:
        blend = torch.ones(h, w)
    else:
        blend = blend_mask.float().reshape(-1, *blend_mask.shape[-2:])[0]
    panels = []
    for panel in (*pair_maps, blend, component):
        panel = _normalise(panel.cpu())[None, None]
        panel = F.interpolate(panel, size=tuple(image_hw), mode="nearest")[0, 0]
        panels.append(panel.unsqueeze(-1).expand(*image_hw, 3))
    return torch.stack(panels)
