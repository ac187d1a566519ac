"""The one attention patch: a replace patch on every attention site (installed by the architecture adapter), an
APPLY_MODEL wrapper that rewrites the conditioning rows, and an OUTER_SAMPLE wrapper that hands the per-run `SwapRun`
to them through `transformer_options["photoswap"]` for exactly one sampling run (reset at its start).

Modes (per CFG chunk one latent row per frame, chunk-major; roles derived from `cond_or_uncond` on every call):
- RECORD: the source row; stores what the swap windows need (into a trace, or for one step in lockstep).
- TARGET: the target row; source tensors come from `source_store` / `source_blend_maps`.
- PLAIN: plain attention (the flow inversion's evaluations that no swap step reads).
In a target call of a clip, the target rows' own self-attention also attends to their anchor frames' keys and
values (`frame_attention`, photoswap_core/frames.py); the source rows never do.
Lockstep is the sampler alternating a record call and a target call every step, so it runs exactly the arithmetic
of the recorded-trace mode.
Exact fused forms (DESIGN.md §3): output swap copies the source attention output; self-map swap is
SDPA(q_s, k_s, v_t); cross-map swap is computed from explicit maps over the prompt's tokens. No self-attention map is
materialised. Which swap fired where is logged at DEBUG level on the "photoswap.swaps" logger (record attribute
`photoswap_swap` = (step, kind, layer, half)).
"""
from __future__ import annotations

import functools
import logging
from enum import Enum

import torch

from . import frames, swap_rules
from .blend import SwapMasks
from .joint_attention import JointSwap
from .trace import TensorKind, TraceKey

PATCH_KEY = "photoswap"
SWAP_LOG = logging.getLogger("photoswap.swaps")


class RunMode(str, Enum):
    RECORD = "record"
    TARGET = "target"
    PLAIN = "plain"  # a call that is neither (the flow inversion's extra evaluations): plain attention


def explicit_cross_maps(q, k, heads: int, attn_precision=None, allowed=None) -> torch.Tensor:
    """softmax(q kᵀ / √d) per head: q [B, Nq, H·d], k [B, Nk, H·d] → [B, H, Nq, Nk]; `allowed` [Nq, Nk] (bool)
    masks the logits of the columns a query may not attend to."""
    b, nq, inner = q.shape
    d = inner // heads
    dtype = torch.float32 if attn_precision == torch.float32 else q.dtype
    qh = q.reshape(b, nq, heads, d).transpose(1, 2).to(dtype)
    kh = k.reshape(b, k.shape[1], heads, d).transpose(1, 2).to(dtype)
    sim = torch.matmul(qh, kh.transpose(-1, -2)) * (d ** -0.5)
    if allowed is not None:
        sim = sim.masked_fill(~allowed, float("-inf"))
    return sim.softmax(dim=-1)


def maps_times_values(maps: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, H, Nq, Nk] maps × v [B, Nk, H·d] → attention output [B, Nq, H·d]."""
    b, nk, inner = v.shape
    vh = v.reshape(b, nk, heads, inner // heads).transpose(1, 2).to(maps.dtype)
    out = torch.matmul(maps, vh)
    return out.transpose(1, 2).reshape(b, maps.shape[2], inner).to(v.dtype)


class SwapRun:
    """Per-run state shared by the patches, the APPLY_MODEL wrapper and the sampler function.

    Created fresh by each node execution; `begin_run` resets step-dependent state at the start of every sampling
    run (the OUTER_SAMPLE wrapper calls it).
    """

    def __init__(self, arch, mode: RunMode, steps, windows, source_store=None, source_blend_maps=None, prompts=None,
                 null_embeddings=None, source_kwargs=None, uncond_kwargs=None, recorder=None, device=None,
                 source_blend_grid=None, region_mask=None, frame_ids=(0,), frame_attention="off",
                 keyframe_interval=frames.DEFAULT_KEYFRAME_INTERVAL):
        self.arch = arch
        self.frames = len(frame_ids)  # latent rows per CFG chunk: the frames of this batch (clip frame numbers)
        # per frame of the batch: the positions of its anchor frames (frame_attention; all () when off)
        self.anchor_rows = [tuple(frame_ids.index(a) for a in frames.anchors(f, frame_attention, keyframe_interval))
                            for f in frame_ids]
        self.mode = RunMode(mode)
        self.steps = steps
        self.windows = windows
        self.source_store = source_store  # AttentionStore with the source tensors (target mode)
        self.source_blend_maps = source_blend_maps  # per step [tokens_b, T] source maps on `device` (target mode)
        self.prompts = prompts
        self.null_embeddings = null_embeddings  # [N, 1 or F, T, C] on device
        self.source_kwargs = source_kwargs or {}  # {'c_crossattn': [1,T,C], 'y': [1,adm]} for the source cond row
        self.uncond_kwargs = uncond_kwargs or {}  # {'y': …} for uncond rows
        self.recorder = recorder  # record mode (and lockstep): a TraceRecorder
        self.source_blend_grid = source_blend_grid  # (h_b, w_b) of the source maps (a trace's; lockstep: recorder's)
        self.step = 0
        self._joint = None  # JointSwap, made at the first joint-attention call (MM-DiT families)
        # made on the compute device once, here: built or copied inside the patch, each would be a blocking
        # host-to-device copy (a host-device synchronisation) at every layer call on a GPU
        self.masks = None
        if prompts is not None:
            self._mapper = prompts.mapper_tensor(device)
            self._alphas = prompts.alphas_tensor(device)
            self.masks = SwapMasks(prompts, windows, steps, device, region_mask)
        self.begin_run()

    def begin_run(self):
        self.step = 0
        if self.masks is not None:
            self.masks.reset()

    def begin_step(self, step: int, latent_hw: tuple) -> None:
        """Target pass, before the target call of `step`: the source maps of the step (recorded, or just computed by
        the lockstep record call) and this step's regions."""
        source_map = self.source_blend_maps[step] if self.source_blend_maps is not None else None
        self.masks.add_source(source_map)
        grid = self.source_blend_grid or (self.recorder.blend_grid if self.recorder is not None else None)
        self.masks.begin_step(latent_hw, grid)

    # ---- row bookkeeping ------------------------------------------------------------------------------------
    def _chunks(self, extra, batch):
        chunks = extra.get("cond_or_uncond") or [0]
        per = batch // len(chunks)
        if per != self.frames or per * len(chunks) != batch:
            raise RuntimeError(
                f"Photoswap: unexpected batch layout ({batch} rows for CFG chunks {chunks}); expected "
                f"{self.frames} frame(s) per chunk")
        return chunks, per

    def _rows(self, ci: int) -> slice:
        """The rows of CFG chunk `ci` (one per frame)."""
        return slice(ci * self.frames, (ci + 1) * self.frames)

    def _per_row(self, weight, chunks):
        """A per-frame weight [F, Nq, 1] for the rows of every chunk."""
        return weight if len(chunks) == 1 else weight.repeat(len(chunks), 1, 1)

    def _log(self, kind, layer, half):
        if SWAP_LOG.isEnabledFor(logging.DEBUG):
            SWAP_LOG.debug("%s swap at step %d, layer %s, CFG half %d", kind, self.step, layer, half,
                           extra={"photoswap_swap": (self.step, kind, layer, half)})

    def _plain(self, prior, q, k, v, extra):
        return prior(q, k, v, extra) if prior is not None else self.arch.attention(q, k, v, extra)

    # ---- prefetch of an offloaded trace -------------------------------------------------------------------------
    def keys_read_at(self, step: int) -> list:
        """The recorded keys the target patches read at `step`, by the same window rules as the reads below."""
        n, w, store = self.steps, self.windows, self.source_store
        kinds = set()
        if swap_rules.output_swap_active(step, n, w):
            kinds.add(TensorKind.SELF_OUT)
        elif swap_rules.map_swap_active(step, n, w):
            kinds.update((TensorKind.SELF_Q, TensorKind.SELF_K))
        if swap_rules.cross_swap_active(step, n, w):
            kinds.update((TensorKind.CROSS_Q, TensorKind.CROSS_K, TensorKind.CROSS_LSE))
        return [key for key in store.tensors if key.kind in kinds and key.step in (step, None)]

    def prefetch(self, step: int, device) -> None:
        """At the start of `step`: stage its keys (if not yet) and the next step's, so the next step's copies overlap
        this step's compute (target mode with an offloaded trace on CUDA; elsewhere `stage` does nothing)."""
        if self.mode is not RunMode.TARGET or self.source_store is None or \
                not self.source_store.host_store_for(device):
            return
        keys = self.keys_read_at(step) + (self.keys_read_at(step + 1) if step + 1 < self.steps else [])
        self.source_store.stage(keys, device)

    # ---- self-attention -----------------------------------------------------------------------------------------
    def self_attention(self, layer, q, k, v, extra, prior):
        i, n, w = self.step, self.steps, self.windows
        chunks, _ = self._chunks(extra, q.shape[0])
        level = self.arch.layer_level(extra)
        if self.mode is RunMode.RECORD:
            out = self._plain(prior, q, k, v, extra)
            self.recorder.record_self(i, layer, chunks, q, k, out, self.arch.self_map_layer(level))
            return out
        store = self.source_store
        region = self.masks.query_weight(self.arch.token_grid(extra))
        region = None if region is None else self._per_row(region, chunks).to(q.dtype)
        if swap_rules.output_swap_active(i, n, w):
            for c in chunks:
                self._log("self_output", layer, c)
            out = torch.cat([store.get(TraceKey.self_out(i, layer, c), q.device) for c in chunks]).to(q.dtype)
            return out if region is None else torch.lerp(self._target_self(prior, q, k, v, extra, chunks), out,
                                                         region)
        if swap_rules.map_swap_active(i, n, w) and self.arch.self_map_layer(level) and 0 in chunks:
            rows = self._rows(chunks.index(0))
            self._log("self_map", layer, 0)
            q_s, k_s = q.clone(), k.clone()
            q_s[rows] = store.get(TraceKey.self_q(i, layer), q.device)
            k_s[rows] = store.get(TraceKey.self_k(i, layer), q.device)
            out = self._plain(prior, q_s, k_s, v, extra)
            return out if region is None else torch.lerp(self._target_self(prior, q, k, v, extra, chunks), out,
                                                         region)
        return self._target_self(prior, q, k, v, extra, chunks)

    def _target_self(self, prior, q, k, v, extra, chunks):
        """The target rows' own self-attention: each frame's keys/values extended with those of its anchor frames
        (the same CFG half's rows), grouped by anchor count so that each group is one attention call."""
        if not any(self.anchor_rows):
            return self._plain(prior, q, k, v, extra)
        groups: dict = {}
        for ci in range(len(chunks)):
            base = ci * self.frames
            for f, anchor in enumerate(self.anchor_rows):
                groups.setdefault(len(anchor), []).append((base + f, [base + a for a in anchor]))
        out = [None] * q.shape[0]
        for rows in groups.values():
            k_ext = torch.stack([torch.cat([k[r]] + [k[a] for a in anchor]) for r, anchor in rows])
            v_ext = torch.stack([torch.cat([v[r]] + [v[a] for a in anchor]) for r, anchor in rows])
            part = self._plain(prior, torch.stack([q[r] for r, _ in rows]), k_ext, v_ext, extra)
            for j, (r, _) in enumerate(rows):
                out[r] = part[j]
        return torch.stack(out)

    # ---- joint attention (MM-DiT: one call over [text; image]) ----------------------------------------------------
    def joint_attention(self, layer, q, k, v, extra, prior):
        """The cond row of a one-row call goes through `JointSwap` (joint_attention.py); anything else is plain."""
        chunks = extra.get("cond_or_uncond") or [0]
        if list(chunks) != [0] or q.shape[0] != 1:
            return self._plain(prior, q, k, v, extra)
        if self._joint is None:
            self._joint = JointSwap(self)
        plain = functools.partial(self._plain, prior, extra=extra)
        if self.mode is RunMode.RECORD:
            return self._joint.record(layer, q, k, v, extra, plain)
        return self._joint.target(layer, q, k, v, extra, plain)

    # ---- cross-attention ----------------------------------------------------------------------------------------
    def cross_attention(self, layer, q, k, v, extra, prior):
        """Cond rows use explicit maps over the prompt's tokens at every step (the same arithmetic in both modes, so
        a source row and a target row that should agree stay bit-identical); uncond rows use the fused kernel (or
        a prior patch)."""
        chunks, _ = self._chunks(extra, q.shape[0])
        if 0 not in chunks:
            return self._plain(prior, q, k, v, extra)
        level = self.arch.layer_level(extra)
        at_blend = self.arch.blend_layer(level, extra)
        rows = self._rows(chunks.index(0))
        heads, precision = extra["n_heads"], extra.get("attn_precision")
        grid = self.arch.token_grid(extra)
        target = self.mode is RunMode.TARGET
        allowed = self.masks.allowed_columns(grid, k.shape[1]) if target else None
        maps = explicit_cross_maps(q[rows], k[rows], heads, precision, allowed)  # [F, H, Nq, T]
        if not target:
            self.recorder.record_cross(self.step, layer, q[rows], k[rows.start], maps if at_blend else None, grid)
        elif swap_rules.cross_swap_active(self.step, self.steps, self.windows):
            swapped = self._swapped_cross_maps(layer, maps, q, heads, precision)
            region = self.masks.query_weight(grid)
            maps = swapped if region is None else torch.lerp(maps, swapped, region.unsqueeze(1).to(maps.dtype))
        if target and at_blend and self.windows.local_blend:
            self.masks.add_target(maps, grid)
        cond_out = maps_times_values(maps, v[rows], heads).to(q.dtype)
        if prior is not None:
            # another pack's patch (IP-Adapter …) keeps its effect on every row and step: the cond row gets the
            # explicit (possibly edited) output plus the prior's change to plain attention — the same arithmetic in
            # record and target calls and whatever the windows, so identity and trace ≡ lockstep stay exact
            out = prior(q, k, v, extra).clone()
            plain = self.arch.attention(q[rows], k[rows], v[rows], extra)
            out[rows] = (cond_out + (out[rows] - plain)).to(out.dtype)
            return out
        parts = [cond_out if c == 0 else self.arch.attention(q[self._rows(j)], k[self._rows(j)], v[self._rows(j)],
                                                              extra)
                 for j, c in enumerate(chunks)]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _swapped_cross_maps(self, layer, maps, q, heads, precision):
        """Target column j := α_j·(source column mapper[j]) + (1 − α_j)·(target column j), no renormalisation."""
        self._log("cross_map", layer, 0)
        q_s = self.source_store.get(TraceKey.cross_q(self.step, layer), q.device)
        q_s = q_s.reshape(-1, *q_s.shape[-2:]).to(q.dtype)  # [F, Nq, C]
        k_s = self.source_store.get(TraceKey.cross_k(layer), q.device).to(q.dtype)
        s_maps = explicit_cross_maps(q_s, k_s.expand(q_s.shape[0], *k_s.shape), heads, precision)
        alphas = self._alphas.to(maps.dtype)  # already on the device: a cast, no transfer
        return s_maps[..., self._mapper] * alphas + maps * (1 - alphas)

    # ---- between steps --------------------------------------------------------------------------------------------
    def end_step(self, step: int, x_source_k: torch.Tensor, x_target_k: torch.Tensor):
        """LocalBlend and the regions after a target step; returns (new target latent, mask or None)."""
        return self.masks.end_step(step, x_source_k, x_target_k)

    # ---- conditioning rows (APPLY_MODEL wrapper) ------------------------------------------------------------------
    def rewrite_inputs(self, c_crossattn, control, transformer_options, kwargs):
        """Per-step null embedding (and the negative's ADM vector) on uncond rows; in a record call the source
        prompt on cond rows and no ControlNet residuals (ControlNet belongs to the target conditioning)."""
        chunks = transformer_options.get("cond_or_uncond") or [0]
        recording = self.mode is RunMode.RECORD
        source_ctx = self.source_kwargs.get("c_crossattn")
        if recording and list(chunks) == [0] and source_ctx is not None and \
                source_ctx.shape[1] != c_crossattn.shape[1]:
            # a one-row call whose target context is longer (Flux + Redux image tokens): the source prompt's own
            # context, without the target's attention mask (Redux's attn_bias belongs to the target)
            kwargs.pop("attention_mask", None)
            c_crossattn = source_ctx.to(c_crossattn.device, c_crossattn.dtype).expand(c_crossattn.shape[0], -1, -1)
        ctx = c_crossattn.clone()
        y = kwargs.get("y")
        y = y.clone() if y is not None else None
        null = self.null_embeddings[min(self.step, self.null_embeddings.shape[0] - 1)]
        per = ctx.shape[0] // len(chunks)
        for row in range(ctx.shape[0]):
            c = chunks[row // per]
            if c == 1:
                ctx[row] = null[row % per if null.shape[0] > 1 else 0].to(ctx.device, ctx.dtype)
                if y is not None and "y" in self.uncond_kwargs:
                    y[row] = self.uncond_kwargs["y"][0].to(y.device, y.dtype)
            elif recording:
                ctx[row] = self.source_kwargs["c_crossattn"][0].to(ctx.device, ctx.dtype)
                if y is not None and "y" in self.source_kwargs:
                    y[row] = self.source_kwargs["y"][0].to(y.device, y.dtype)
        if y is not None:
            kwargs["y"] = y
        if recording and kwargs.get("guidance") is not None and "guidance" in self.source_kwargs:
            guidance = kwargs["guidance"].clone()  # Flux: the source conditioning's distilled guidance
            for row, c in enumerate(chunks):
                if c == 0:
                    guidance[row] = self.source_kwargs["guidance"][0].to(guidance.device, guidance.dtype)
            kwargs["guidance"] = guidance
        if control is not None and recording:
            control = None
        return ctx, control, kwargs


def _apply_model_wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
    run = transformer_options.get(PATCH_KEY)
    if run is not None and c_crossattn is not None:
        c_crossattn, control, kwargs = run.rewrite_inputs(c_crossattn, control, transformer_options, kwargs)
    return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def _outer_sample_wrapper(run: SwapRun):
    """OUTER_SAMPLE wrapper (EasyCache's pattern): this sampling run, and only it, sees `run`, reset at its start.
    The run reaches the patches through a copy of the guider's model options, so nothing of it is left on the
    MODEL afterwards and ComfyUI's clones never copy it."""
    def wrapper(executor, *args, **kwargs):
        import comfy.model_patcher

        guider = executor.class_obj
        original = guider.model_options
        guider.model_options = comfy.model_patcher.create_model_options_clone(original)
        guider.model_options.setdefault("transformer_options", {})[PATCH_KEY] = run
        run.begin_run()
        try:
            return executor(*args, **kwargs)
        finally:
            guider.model_options = original

    return wrapper


def _make_patch(arch, role: str, layer: tuple, prior):
    def patch(q, k, v, extra_options):
        run = extra_options.get(PATCH_KEY)
        if run is None or run.mode is RunMode.PLAIN:  # outside a Photoswap run, or a call it does not record
            return prior(q, k, v, extra_options) if prior is not None else arch.attention(q, k, v, extra_options)
        if role == "self":
            return run.self_attention(layer, q, k, v, extra_options, prior)
        if role == "joint":
            return run.joint_attention(layer, q, k, v, extra_options, prior)
        return run.cross_attention(layer, q, k, v, extra_options, prior)

    patch.photoswap_prior = prior
    return patch


def patch_model(model, run: SwapRun):
    """A clone of `model` with the Photoswap patches and wrappers for `run`; the input MODEL is never modified.

    An existing replace patch on an attention site (another pack's) is kept and called for the plain attention.
    """
    import comfy.patcher_extension

    patched = model.clone()
    run.arch.install_attention_patches(patched, functools.partial(_make_patch, run.arch))
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, PATCH_KEY, _apply_model_wrapper)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, PATCH_KEY,
                                 _outer_sample_wrapper(run))
    return patched
