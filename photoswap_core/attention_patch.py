"""The one attention patch: attn1/attn2 replace patches on every transformer block plus an APPLY_MODEL wrapper,
driven by a per-run `SwapRun` found in `transformer_options["photoswap"]`.

Modes (one latent row per CFG chunk; roles derived from `cond_or_uncond` on every call):
- "record": the source row; stores what the swap windows need (into a trace, or for one step in lockstep).
- "target": the target row; source tensors come from `source_store` / `source_blend_maps`.
Lockstep is the sampler alternating a record call and a target call every step, so it runs exactly the arithmetic
of the recorded-trace mode.
Exact fused forms (DESIGN.md §3): output swap copies the source attention output; self-map swap is
SDPA(q_s, k_s, v_t); cross-map swap is computed from explicit 77-column maps. No self-attention map is materialised.
"""
from __future__ import annotations

import torch

from . import swap_rules
from .blend import apply_blend, blend_mask
from .trace import step_of

PATCH_KEY = "photoswap"


def _default_attention(prior, q, k, v, extra):
    if prior is not None:
        return prior(q, k, v, extra)
    from comfy.ldm.modules.attention import optimized_attention

    return optimized_attention(q, k, v, extra["n_heads"], attn_precision=extra.get("attn_precision"))


def explicit_cross_maps(q, k, heads: int, attn_precision=None) -> torch.Tensor:
    """softmax(q kᵀ / √d) per head: q [B, Nq, H·d], k [B, 77, H·d] → [B, H, Nq, 77]."""
    b, nq, inner = q.shape
    d = inner // heads
    dtype = torch.float32 if attn_precision == torch.float32 else q.dtype
    qh = q.reshape(b, nq, heads, d).transpose(1, 2).to(dtype)
    kh = k.reshape(b, k.shape[1], heads, d).transpose(1, 2).to(dtype)
    sim = torch.matmul(qh, kh.transpose(-1, -2)) * (d ** -0.5)
    return sim.softmax(dim=-1)


def maps_times_values(maps: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, H, Nq, 77] maps × v [B, 77, H·d] → attention output [B, Nq, H·d]."""
    b, nk, inner = v.shape
    vh = v.reshape(b, nk, heads, inner // heads).transpose(1, 2).to(maps.dtype)
    out = torch.matmul(maps, vh)
    return out.transpose(1, 2).reshape(b, maps.shape[2], inner).to(v.dtype)


class SwapRun:
    """Per-run state shared by the patches, the APPLY_MODEL wrapper and the sampler function.

    Created fresh by each node execution; `begin_run` resets step-dependent state at the start of every sampling run.
    """

    def __init__(self, mode, steps, windows, source_store=None, source_blend_maps=None, prompts=None,
                 null_embeddings=None, source_kwargs=None, uncond_kwargs=None, recorder=None, device=None):
        assert mode in ("record", "target")
        self.mode = mode
        self.steps = steps
        self.windows = windows
        self.source_store = source_store  # AttentionStore with the source tensors (target mode)
        self.source_blend_maps = source_blend_maps  # per step [tokens_b, 77] source maps on `device` (target mode)
        self.prompts = prompts
        self.null_embeddings = null_embeddings  # [N, 1, 77, C] on device
        self.source_kwargs = source_kwargs or {}  # {'c_crossattn': [1,77,C], 'y': [1,adm]} for the source cond row
        self.uncond_kwargs = uncond_kwargs or {}  # {'y': …} for uncond rows
        self.recorder = recorder  # record mode: a TraceRecorder
        self.step = 0
        self.active = True
        self.events = None  # tests may set a list to instrument which swaps fire: (step, kind, layer, half)
        self.begin_run()
        if prompts is not None:
            # made on the compute device once, here: built or copied inside the patch, each would be a blocking
            # host-to-device copy (a host-device synchronisation) at every layer call on a GPU
            self._mapper = prompts.mapper_tensor(device)
            self._alphas = prompts.alphas_tensor(device)
            self._src_cols = torch.tensor(prompts.source_subject_positions, dtype=torch.int64, device=device)
            self._tgt_cols = torch.tensor(prompts.target_subject_positions, dtype=torch.int64, device=device)

    def __deepcopy__(self, memo):  # ComfyUI 0.3.75 deep-copies model_options on clone(): share, don't duplicate
        return self

    def begin_run(self):
        self.step = 0
        self.blend_source = None
        self.blend_target = None
        self.blend_grid = None
        self.step_blend_map = None  # record mode: this step's [tokens_b, 77] source map

    # ---- row bookkeeping ------------------------------------------------------------------------------------
    def _chunks(self, extra, batch):
        chunks = extra.get("cond_or_uncond") or [0]
        per = batch // len(chunks)
        if per != 1:
            raise RuntimeError(
                f"Photoswap: unexpected batch layout ({batch} rows for CFG chunks {chunks}); the latent batch must "
                "be 1 (batches of images are not supported)")
        return chunks, per

    def _log(self, kind, layer, half):
        if self.events is not None:
            self.events.append((self.step, kind, layer, half))

    # ---- prefetch of an offloaded trace -------------------------------------------------------------------------
    def keys_read_at(self, step: int) -> list:
        """The recorded keys the target patches read at `step`, by the same window rules as the reads below."""
        n, w, store = self.steps, self.windows, self.source_store
        kinds = set()
        if swap_rules.output_swap_active(step, n, w):
            kinds.add("out")
        elif swap_rules.map_swap_active(step, n, w):
            kinds.update(("q", "k"))
        if swap_rules.cross_swap_active(step, n, w):
            kinds.update(("cq", "ck"))
        return [key for key in store.tensors if key[0] in kinds and step_of(key) in (step, None)]

    def prefetch(self, step: int, device) -> None:
        """At the start of `step`: stage its keys (if not yet) and the next step's, so the next step's copies overlap
        this step's compute (target mode with an offloaded trace on CUDA; elsewhere `stage` does nothing)."""
        if self.mode != "target" or self.source_store is None or not self.source_store.host_store_for(device):
            return
        keys = self.keys_read_at(step) + (self.keys_read_at(step + 1) if step + 1 < self.steps else [])
        self.source_store.stage(keys, device)

    # ---- self-attention -----------------------------------------------------------------------------------------
    def self_attention(self, layer, q, k, v, extra, prior):
        i, n, w = self.step, self.steps, self.windows
        chunks, _ = self._chunks(extra, q.shape[0])
        level = swap_rules.layer_level(extra)
        if self.mode == "record":
            out = _default_attention(prior, q, k, v, extra)
            self.recorder.record_self(i, layer, chunks, q, k, out, level)
            return out
        store = self.source_store
        if swap_rules.output_swap_active(i, n, w):
            for c in chunks:
                self._log("self_output", layer, c)
            return torch.cat([store.get(("out", i, layer, c), q.device) for c in chunks]).to(q.dtype)
        if swap_rules.map_swap_active(i, n, w) and swap_rules.self_map_layer(level) and 0 in chunks:
            ci = chunks.index(0)
            self._log("self_map", layer, 0)
            q, k = q.clone(), k.clone()
            q[ci] = store.get(("q", i, layer), q.device)
            k[ci] = store.get(("k", i, layer), q.device)
        return _default_attention(prior, q, k, v, extra)

    # ---- cross-attention ----------------------------------------------------------------------------------------
    def cross_attention(self, layer, q, k, v, extra, prior):
        """Cond rows use explicit 77-column maps at every step (the same arithmetic in both modes, so a source row
        and a target row that should agree stay bit-identical); uncond rows use the fused kernel (or a prior patch)."""
        i, n, w = self.step, self.steps, self.windows
        chunks, _ = self._chunks(extra, q.shape[0])
        if 0 not in chunks:
            return _default_attention(prior, q, k, v, extra)
        level = swap_rules.layer_level(extra)
        at_blend = swap_rules.blend_layer(level, extra["block"][0])
        cross_on = swap_rules.cross_swap_active(i, n, w)
        ci = chunks.index(0)
        heads, precision = extra["n_heads"], extra.get("attn_precision")
        grid = tuple(extra["activations_shape"][2:])
        maps = explicit_cross_maps(q[ci:ci + 1], k[ci:ci + 1], heads, precision)  # [1, H, Nq, 77]
        if self.mode == "record":
            self.recorder.record_cross(i, layer, q[ci], k[ci], maps if at_blend else None, grid)
        elif cross_on:
            self._log("cross_map", layer, 0)
            q_s = self.source_store.get(("cq", i, layer), q.device).unsqueeze(0).to(q.dtype)
            k_s = self.source_store.get(("ck", layer), q.device).unsqueeze(0).to(q.dtype)
            s_maps = explicit_cross_maps(q_s, k_s, heads, precision)
            alphas = self._alphas.to(maps.dtype)  # already on the device: a cast, no transfer
            maps = s_maps[..., self._mapper] * alphas + maps * (1 - alphas)
        if self.mode == "target" and at_blend and w.local_blend:
            self._accumulate_blend(maps[..., self._tgt_cols].sum(-1).mean(1)[0].float(), grid)
        cond_out = maps_times_values(maps, v[ci:ci + 1], heads).to(q.dtype)
        if prior is not None:
            # another pack's patch (IP-Adapter …) keeps its effect on every row and step: the cond row gets the
            # explicit (possibly edited) output plus the prior's change to plain attention — the same arithmetic in
            # record and target calls and whatever the windows, so identity and trace ≡ lockstep stay exact
            out = prior(q, k, v, extra).clone()
            plain = _default_attention(None, q[ci:ci + 1], k[ci:ci + 1], v[ci:ci + 1], extra)
            out[ci] = (cond_out[0] + (out[ci] - plain[0])).to(out.dtype)
            return out
        parts = [cond_out if c == 0 else _default_attention(None, q[j:j + 1], k[j:j + 1], v[j:j + 1], extra)
                 for j, c in enumerate(chunks)]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _accumulate_blend(self, tgt_cols, grid):
        self.blend_grid = grid
        self.blend_target = tgt_cols if self.blend_target is None else self.blend_target + tgt_cols

    # ---- between steps --------------------------------------------------------------------------------------------
    def end_step(self, step: int, x_source_k: torch.Tensor, x_target_k: torch.Tensor):
        """LocalBlend after a target step; returns (new target latent, mask or None)."""
        source_map = self.source_blend_maps[step] if self.windows.local_blend else None
        if source_map is not None:
            cols = source_map[..., self._src_cols].sum(-1)
            self.blend_source = cols if self.blend_source is None else self.blend_source + cols
        if not swap_rules.blend_active(step, self.steps, self.windows) or self.blend_target is None:
            return x_target_k, None
        h, w = self.blend_grid
        mask = blend_mask(self.blend_source.reshape(h, w), self.blend_target.reshape(h, w),
                          x_target_k.shape[-2:], self.windows.blend_threshold).to(x_target_k.device)
        return apply_blend(x_source_k, x_target_k, mask), mask

    # ---- conditioning rows (APPLY_MODEL wrapper) ------------------------------------------------------------------
    def rewrite_inputs(self, c_crossattn, control, transformer_options, kwargs):
        """Per-step null embedding (and the negative's ADM vector) on uncond rows; in a record call the source
        prompt on cond rows and no ControlNet residuals (ControlNet belongs to the target conditioning)."""
        chunks = transformer_options.get("cond_or_uncond") or [0]
        ctx = c_crossattn.clone()
        y = kwargs.get("y")
        y = y.clone() if y is not None else None
        null = self.null_embeddings[min(self.step, self.null_embeddings.shape[0] - 1)]
        for row, c in enumerate(chunks):
            if c == 1:
                ctx[row] = null[0].to(ctx.device, ctx.dtype)
                if y is not None and "y" in self.uncond_kwargs:
                    y[row] = self.uncond_kwargs["y"][0].to(y.device, y.dtype)
            elif self.mode == "record":
                ctx[row] = self.source_kwargs["c_crossattn"][0].to(ctx.device, ctx.dtype)
                if y is not None and "y" in self.source_kwargs:
                    y[row] = self.source_kwargs["y"][0].to(y.device, y.dtype)
        if y is not None:
            kwargs["y"] = y
        if control is not None and self.mode == "record":
            control = None
        return ctx, control, kwargs


def _apply_model_wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
    run = transformer_options.get(PATCH_KEY)
    if run is not None and run.active and c_crossattn is not None:
        c_crossattn, control, kwargs = run.rewrite_inputs(c_crossattn, control, transformer_options, kwargs)
    return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def _make_patch(kind: str, layer: tuple, prior):
    def patch(q, k, v, extra_options):
        run = extra_options.get(PATCH_KEY)
        if run is None or not run.active:
            return _default_attention(prior, q, k, v, extra_options)
        if kind == "attn1":
            return run.self_attention(layer, q, k, v, extra_options, prior)
        return run.cross_attention(layer, q, k, v, extra_options, prior)

    patch.photoswap_prior = prior
    return patch


def transformer_layers(diffusion_model) -> list[tuple]:
    """(block_name, number, index) of every BasicTransformerBlock, in call order."""
    from comfy.ldm.modules.attention import SpatialTransformer

    layers = []
    for name, blocks in (("input", diffusion_model.input_blocks), ("middle", [diffusion_model.middle_block]),
                         ("output", diffusion_model.output_blocks)):
        for number, block in enumerate(blocks):
            for module in block:
                if isinstance(module, SpatialTransformer):
                    layers.extend((name, number, i) for i in range(len(module.transformer_blocks)))
    return layers


def patch_model(model, run: SwapRun):
    """A clone of `model` with the Photoswap patches and `run` installed; the input MODEL is never modified.

    An existing replace patch on a block (another pack's) is kept and called for the plain attention computation.
    """
    patched = model.clone()
    options = patched.model_options.setdefault("transformer_options", {})
    replace = options.get("patches_replace", {})
    for layer in transformer_layers(patched.model.diffusion_model):
        for kind in ("attn1", "attn2"):
            existing = replace.get(kind, {})
            prior = existing.get(layer) or existing.get(layer[:2])
            patched.set_model_patch_replace(_make_patch(kind, layer, prior), kind, layer[0], layer[1], layer[2])
    patched.model_options["transformer_options"][PATCH_KEY] = run
    import comfy.patcher_extension

    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, PATCH_KEY, _apply_model_wrapper)
    return patched
