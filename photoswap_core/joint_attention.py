"""Photoswap on joint [text; image] attention (an MM-DiT such as Flux): one attention call per block over the text
tokens followed by the image tokens (Kontext reference tokens, if any, after them), q/k already rotated (RoPE).

Only the target's image *query* rows are edited; its text rows keep the target prompt's own attention. Per block in
its role's site set (`arch.sites(windows)`) and step window (`swap_rules`):
- self-output: the image rows' output := the source's (a region lerps it);
- self-map (where the output swap is off): image queries see the source's logits on image keys and the target's own
  on text keys, target values: one SDPA with doubled head dim, q' = [q_t | q_s], text keys [k_t | 0], image keys
  [0 | k_s] (exact: the logits are q_t·k_t on text and q_s·k_s on image columns);
- cross-map (where the output swap is off): the image→text block P of the joint map (normalised over the whole row)
  is mixed column by column, P'_j = α_j·P_s[:, mapper_j] + (1 − α_j)·P_t[:, j], no renormalisation, and the output
  changes by (P' − P_t)·v_text;
- LocalBlend: P (edited in the target) summed over the subject columns, mean over heads, at the blend sites.
Edits are added as differences of two evaluations of the same function (`plain + (edited − same form unedited)`), so a
target row that equals the source row is left bit-identical, while the result equals the explicit form to float
rounding. Source and target share the image size, so swapped image tokens keep their RoPE positions (no second token
set is concatenated: no "ghosting").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import swap_rules
from .trace import TraceKey

ROW_CHUNK = 1024  # image query rows per explicit logits block


def _mask_rows(mask, rows: slice):
    """The attention mask's rows for some queries, broadcastable to [B, H, rows, L] (None stays None)."""
    if mask is None:
        return None
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    return m[..., rows, :]


def row_lse(q_img, k, mask=None) -> torch.Tensor:
    """log Σ_j exp(q_i·k_j/√d (+ mask)) over every key, per image query row: [B, H, Li] float32, in row chunks."""
    scale = q_img.shape[-1] ** -0.5
    kt = k.float().transpose(-1, -2)
    parts = []
    for start in range(0, q_img.shape[2], ROW_CHUNK):
        rows = slice(start, min(start + ROW_CHUNK, q_img.shape[2]))
        logits = torch.matmul(q_img[:, :, rows].float(), kt) * scale
        m = _mask_rows(mask, rows)
        if m is not None:
            logits = logits + m.float()
        parts.append(torch.logsumexp(logits, dim=-1))
    return torch.cat(parts, dim=-1)


def text_block(q_img, k_txt, lse, mask_txt=None) -> torch.Tensor:
    """The image→text block of the joint (whole-row normalised) map: [B, H, Li, Lt] float32."""
    logits = torch.matmul(q_img.float(), k_txt.float().transpose(-1, -2)) * (q_img.shape[-1] ** -0.5)
    if mask_txt is not None:
        logits = logits + mask_txt.float()
    return torch.exp(logits - lse.unsqueeze(-1))


def self_map_rows(q_img_t, k, v, q_img_s, k_img_s, l_txt: int, mask_img=None) -> torch.Tensor:
    """Image rows' output [B, Li, H·D] when image queries use (q_s, k_s) logits on the image keys and the target's
    (q_t, k_t) on every other key, with the target's values: one SDPA with the head dimension doubled."""
    b, h, _, d = q_img_t.shape
    l_img = q_img_s.shape[2]
    q2 = torch.cat([q_img_t, q_img_s.to(q_img_t.dtype)], dim=-1)
    k2 = torch.cat([k, torch.zeros_like(k)], dim=-1)
    k2[:, :, l_txt:l_txt + l_img, :d] = 0
    k2[:, :, l_txt:l_txt + l_img, d:] = k_img_s.to(k.dtype)
    out = F.scaled_dot_product_attention(q2, k2, v, attn_mask=None if mask_img is None else mask_img.to(q2.dtype),
                                         scale=d ** -0.5)
    return out.transpose(1, 2).reshape(b, l_img, h * d)


def _heads_out(block: torch.Tensor) -> torch.Tensor:
    """[B, H, Li, D] → [B, Li, H·D] (what Flux's attention returns)."""
    b, h, n, d = block.shape
    return block.transpose(1, 2).reshape(b, n, h * d)


class JointSwap:
    """The joint-attention rules of one `SwapRun` (record and target calls), keyed by the run's step and windows."""

    def __init__(self, run):
        self.run = run
        self._sites = run.arch.sites(run.windows)

    def _where(self, extra):
        return self.run.arch.joint_layout(extra)

    def _active(self, layer):
        run = self.run
        i, n, w = run.step, run.steps, run.windows
        out = swap_rules.output_swap_active(i, n, w) and layer in self._sites["self_output"]
        smap = (not out and swap_rules.map_swap_active(i, n, w) and w.self_map > 0
                and layer in self._sites["self_map"])
        cross = not out and swap_rules.cross_swap_active(i, n, w) and layer in self._sites["cross_map"]
        return out, smap, cross

    # ---- the source row ---------------------------------------------------------------------------------------
    def record(self, layer, q, k, v, extra, plain):
        """Plain attention; store what the target's windows read and the LocalBlend maps at the blend sites. A
        recorded trace keeps every block (it serves any site sets); the lockstep record call (the target's run,
        which has a source store) only its roles' sites."""
        run, recorder = self.run, self.run.recorder
        i, n, w = run.step, run.steps, run.windows
        l_txt, img, grid = self._where(extra)
        out = plain(q, k, v)
        lockstep = run.source_store is not None

        def wanted(role):
            return not lockstep or layer in self._sites[role]

        if swap_rules.output_swap_active(i, n, w) and wanted("self_output"):
            recorder.put(TraceKey.self_out(i, layer, 0), out[:, img])
        if recorder.record_self_maps and swap_rules.map_swap_active(i, n, w) and wanted("self_map"):
            recorder.put(TraceKey.self_q(i, layer), q[0, :, img])
            recorder.put(TraceKey.self_k(i, layer), k[0, :, img])
        cross = swap_rules.cross_swap_active(i, n, w) and recorder.store is not None and wanted("cross_map")
        blend = layer in self._sites["blend"]
        if cross or blend:
            mask = extra.get("mask")
            lse = row_lse(q[:, :, img], k, _mask_rows(mask, img))
            if cross:
                recorder.put(TraceKey.cross_q(i, layer), q[0, :, img])
                recorder.put(TraceKey.joint_text_k(i, layer), k[0, :, :l_txt])
                recorder.put(TraceKey.cross_lse(i, layer), lse[0])
            if blend:
                m = _mask_rows(mask, img)
                maps = text_block(q[:, :, img], k[:, :, :l_txt], lse, None if m is None else m[..., :l_txt])
                recorder.add_blend_map(i, maps.mean(1)[0], grid)
        return out

    # ---- the target row ---------------------------------------------------------------------------------------
    def target(self, layer, q, k, v, extra, plain):
        run = self.run
        i = run.step
        l_txt, img, grid = self._where(extra)
        out = plain(q, k, v)
        use_out, use_map, use_cross = self._active(layer)
        blend = run.windows.local_blend and layer in self._sites["blend"]
        if not (use_out or use_map or use_cross or blend):
            return out
        store, mask = run.source_store, extra.get("mask")
        m_img = _mask_rows(mask, img)
        region = run.masks.query_weight(grid)
        rows = out[:, img]
        if use_out:
            run._log("self_output", layer, 0)
            source = store.get(TraceKey.self_out(i, layer, 0), q.device).to(out.dtype)
            rows = source if region is None else torch.lerp(rows, source, region.to(out.dtype))
        elif use_map:
            run._log("self_map", layer, 0)
            q_s = store.get(TraceKey.self_q(i, layer), q.device).unsqueeze(0)
            k_s = store.get(TraceKey.self_k(i, layer), q.device).unsqueeze(0)
            swapped = self_map_rows(q[:, :, img], k, v, q_s, k_s, l_txt, m_img)
            same = self_map_rows(q[:, :, img], k, v, q[:, :, img], k[:, :, img], l_txt, m_img)
            delta = swapped - same
            rows = rows + (delta if region is None else delta * region.to(delta.dtype))
        if use_cross or blend:
            m_txt = None if m_img is None else m_img[..., :l_txt]
            maps = text_block(q[:, :, img], k[:, :, :l_txt], row_lse(q[:, :, img], k, m_img), m_txt)
            if use_cross:
                edited = self._swapped_text_block(layer, maps, q.device)
                if region is not None:
                    edited = torch.lerp(maps, edited, region.to(maps.dtype))
                delta = torch.matmul(edited - maps, v[:, :, :l_txt].float())
                rows = rows + _heads_out(delta).to(rows.dtype)
                maps = edited
            if blend:
                run.masks.add_target(maps, grid)
        out = out.clone()
        out[:, img] = rows
        return out

    def _swapped_text_block(self, layer, maps, device):
        run = self.run
        run._log("cross_map", layer, 0)
        store, i = run.source_store, run.step
        q_s = store.get(TraceKey.cross_q(i, layer), device).unsqueeze(0)
        k_s = store.get(TraceKey.joint_text_k(i, layer), device).unsqueeze(0)
        lse_s = store.get(TraceKey.cross_lse(i, layer), device).unsqueeze(0)
        source = text_block(q_s, k_s, lse_s)
        alphas = run._alphas.to(maps.dtype)
        n = alphas.shape[0]  # the prompt's columns; tokens after them (Redux image tokens) keep the target's own
        edited = source[..., run._mapper] * alphas + maps[..., :n] * (1 - alphas)
        return edited if maps.shape[-1] == n else torch.cat([edited, maps[..., n:]], dim=-1)
