"""The source pass (Attention Recorder): reproduce the source image and keep what the swap windows need.

With an inversion the source row follows its trajectory (the real photo); without one it is generated from a seed
(a synthetic source). What is stored, within `fraction` of the steps and a memory budget, is decided by
`TraceRecorder`; over budget nothing is kept and the swap sampler runs in lockstep.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch

from . import frames, swap_rules
from .arch import inspect_model
from .attention_patch import RunMode, SwapRun, patch_model
from .errors import PhotoswapInputError
from .evaluator import DirectEvaluator
from .sampling import SamplingPlan, flow_inversion_sampler, sample
from .trace import AttentionStore, SourceTrace, TensorKind, TraceKey

log = logging.getLogger("photoswap")


def _auto_budget_bytes(device) -> tuple[int, int]:
    """(device budget, CPU budget) for recorded attention tensors."""
    import psutil

    cpu = int(psutil.virtual_memory().available * 0.5)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5), cpu
    return cpu, cpu


class TraceRecorder:
    """Decides what the source pass stores (within `fraction` of the steps and a memory budget)."""

    def __init__(self, steps, windows, record_self_maps, device, budget_bytes=None, storage="auto"):
        self.steps = steps
        self.windows = windows
        self.record_self_maps = record_self_maps
        device_budget, cpu_budget = _auto_budget_bytes(device)
        if budget_bytes is not None:
            device_budget = cpu_budget = budget_bytes
        self.device_budget, self.cpu_budget = device_budget, cpu_budget
        location = torch.device("cpu") if storage == "cpu" else device
        self.storage = storage
        self.store = AttentionStore(location) if budget_bytes != 0 else None
        self.blend_maps = [None] * steps
        self.blend_grid = None
        self.dropped_reason = None

    def begin_step(self):
        """Lockstep: keep only the current step's tensors."""
        self.store.tensors.clear()
        self.store.nbytes = 0

    def _check_budget(self):
        store = self.store
        if store is None:
            return
        if store.location.type != "cpu" and store.nbytes > self.device_budget and self.storage == "auto":
            log.info("Photoswap trace: %.1f MB exceed the device budget; offloading to CPU", store.nbytes / 2**20)
            store.move_to(torch.device("cpu"))
        limit = self.cpu_budget if store.location.type == "cpu" else self.device_budget
        if store.nbytes > limit:
            self.dropped_reason = f"the attention tensors exceed the memory budget ({limit / 2**30:.2f} GB)"
            log.warning("Photoswap trace: %s; the swap sampler will run in lockstep", self.dropped_reason)
            self.store = None

    def record_self(self, i, layer, chunks, q, k, out, self_map_layer: bool):
        """Rows are CFG chunks × frames (chunk-major); each tensor is stored with its frame dimension."""
        if self.store is None:
            return
        per = q.shape[0] // len(chunks)
        if swap_rules.output_swap_active(i, self.steps, self.windows):
            for ci, c in enumerate(chunks):
                self.store.put(TraceKey.self_out(i, layer, c), out[ci * per:(ci + 1) * per])
        if (self.record_self_maps and 0 in chunks and swap_rules.map_swap_active(i, self.steps, self.windows)
                and self_map_layer):
            ci = chunks.index(0)
            self.store.put(TraceKey.self_q(i, layer), q[ci * per:(ci + 1) * per])
            self.store.put(TraceKey.self_k(i, layer), k[ci * per:(ci + 1) * per])
        self._check_budget()

    def put(self, key, tensor) -> None:
        """Store one source tensor (nothing once the trace was dropped or not kept)."""
        if self.store is not None:
            self.store.put(key, tensor)
            self._check_budget()

    def add_blend_map(self, i, layer_map, grid) -> None:
        """Add one blend layer's source map [tokens_b, T] (mean over heads) to step i's LocalBlend map."""
        layer_map = layer_map.float()
        self.blend_maps[i] = layer_map if self.blend_maps[i] is None else self.blend_maps[i] + layer_map
        self.blend_grid = grid

    def record_cross(self, i, layer, q_cond, k_cond, maps, grid):
        """`q_cond` [F, Nq, C] (the cond rows), `k_cond` [T, C] (the source prompt's, the same for every frame),
        `maps` [F, H, Nq, T] at a blend layer."""
        if self.store is not None and swap_rules.cross_swap_active(i, self.steps, self.windows):
            self.store.put(TraceKey.cross_q(i, layer), q_cond)
            if not self.store.has(TraceKey.cross_k(layer)):
                self.store.put(TraceKey.cross_k(layer), k_cond)
            self._check_budget()
        if maps is not None:
            layer_map = maps.mean(1).float()
            layer_map = layer_map[0] if layer_map.shape[0] == 1 else layer_map  # an image keeps [tokens_b, T]
            self.blend_maps[i] = layer_map if self.blend_maps[i] is None else self.blend_maps[i] + layer_map
            self.blend_grid = grid


def y_only(kwargs: dict) -> dict:
    """The pooled/ADM part of model kwargs (what the uncond rows keep from the negative)."""
    return {"y": kwargs["y"]} if "y" in kwargs else {}


def _source_run(model, arch, source_positive, negative, shape, steps, windows, recorder, null_embeddings=None):
    """(SwapRun in RECORD mode for the source row, its null embeddings [N, 1, T, C], compute device): the one setup of
    every source pass (the Recorder's, the flow inversion's, the completion of its recording). Nulls default to the
    negative's embedding at every step."""
    evaluator = DirectEvaluator(model, shape, arch=arch)
    src_kwargs = evaluator.model_kwargs(arch.prompt_entry(model, source_positive, "source_positive"))
    neg_kwargs = evaluator.model_kwargs(arch.prompt_entry(model, negative, "negative"))
    if null_embeddings is None:
        ctx = neg_kwargs["c_crossattn"].float()
        null_embeddings = ctx.unsqueeze(0).expand(steps, *ctx.shape).clone()
    run = SwapRun(arch, RunMode.RECORD, steps, windows, null_embeddings=null_embeddings.to(evaluator.device),
                  recorder=recorder, source_kwargs=src_kwargs, uncond_kwargs=y_only(neg_kwargs),
                  frame_ids=tuple(range(shape[0])))
    return run, null_embeddings, evaluator.device


def record_trace(model, source_positive, negative, schedule, cfg, *, trajectory_vp=None, start_latent_vp=None,
                 null_embeddings=None, method="synthetic", fraction=1.0, record_self_maps=False, budget_bytes=None,
                 storage="auto", callback=None) -> SourceTrace:
    """Run the source pass and build a SourceTrace (real image: trajectory given; synthetic: start latent given).
    Latents are model-space latents (`trajectory_vp`, `start_latent_vp`)."""
    arch = inspect_model(model)
    shape = tuple((trajectory_vp[0] if trajectory_vp is not None else start_latent_vp).shape)
    n = schedule.steps
    windows = swap_rules.recorded_windows(fraction)
    recorder = TraceRecorder(n, windows, record_self_maps, model.load_device, 0 if fraction <= 0 else budget_bytes,
                             storage)
    run, null_embeddings, device = _source_run(model, arch, source_positive, negative, shape, n, windows, recorder,
                                               null_embeddings)
    plan = SamplingPlan(scales=arch.sampler_scales(schedule.sigmas))
    if trajectory_vp is not None:
        plan.trajectory_k = [t.to(device, torch.float32) * plan.scales[i] for i, t in enumerate(trajectory_vp)]
        start = plan.trajectory_k[0]
    else:
        start = start_latent_vp.to(device, torch.float32) * plan.scales[0]
        plan.start_k = start
    needs_pass = trajectory_vp is None or recorder.store is not None
    if needs_pass:
        sample(patch_model(model, run), run, plan, arch.to_latent(start.cpu()), schedule.sigmas, source_positive,
               negative, cfg, callback)
    if trajectory_vp is None:
        trajectory_vp = [start_latent_vp.float().cpu()] + [g.cpu() for g in plan.generated_vp]
    return _trace(model, arch, recorder, schedule, shape, trajectory_vp, null_embeddings, source_positive, negative,
                  cfg, method, fraction, record_self_maps, plan.source_steps_out if needs_pass else None, device)


def _trace(model, arch, recorder, schedule, shape, trajectory_vp, null_embeddings, source_positive, negative, cfg,
           method, fraction, record_self_maps, source_steps, device) -> SourceTrace:
    """The SourceTrace of a finished source pass (its copies to the host landed)."""
    import comfy.model_management as mm

    trace = SourceTrace(
        schedule=schedule, arch=arch, latent_shape=shape, trajectory=[t.detach().float().cpu() for t in trajectory_vp],
        null_embeddings=null_embeddings.detach().float().cpu(), source_conditioning=source_positive,
        negative_conditioning=negative, cfg=cfg, method=method,
        record_fraction=fraction if recorder.store is not None else 0.0,
        weights_fingerprint=arch.weights_fingerprint(model),
        blend_maps=[m.cpu() if m is not None else None for m in recorder.blend_maps], blend_grid=recorder.blend_grid,
        store=recorder.store, self_maps_recorded=record_self_maps and recorder.store is not None,
        dropped_reason=recorder.dropped_reason,
        source_steps_k=[c.detach().cpu() for c in source_steps] if source_steps is not None else None)
    if recorder.store is not None:
        recorder.store.wait_for_copies(device)
    mm.soft_empty_cache()
    return trace


# ---- the source pass recorded during a flow inversion ----------------------------------------------------------------
@dataclass
class InversionRecording:
    """What a flow inversion recorded of the source pass on its way (the widest windows, no self maps): steps 1 … N−1
    of the trace, for the Recorder to complete with step 0 instead of running the whole pass again."""
    recorder: TraceRecorder
    source_steps_k: list  # per step the source's own step result (sampler space); None at step 0
    source_conditioning: list
    model: weakref.ref  # the ModelPatcher it was recorded with: the Recorder reuses it only for that very object


def invert_flow(model, source_positive, negative, schedule, image_vp, cfg, solver="euler", progress=None):
    """The flow-ODE inversion of a model-space image latent as one sampler pass (`flow_inversion_sampler`), recording
    the source pass's steps 1 … N−1 on the way. Returns (N+1 inversion latents, image first; the null embeddings
    [N, 1, T, C]; InversionRecording)."""
    arch = inspect_model(model)
    n = schedule.steps
    windows = swap_rules.recorded_windows(1.0)
    recorder = TraceRecorder(n, windows, False, model.load_device)
    run, nulls, device = _source_run(model, arch, source_positive, negative, tuple(image_vp.shape), n, windows,
                                     recorder)
    plan = SamplingPlan(scales=arch.sampler_scales(schedule.sigmas), image_k=image_vp.to(device, torch.float32),
                        solver=solver, progress=progress)
    sample(patch_model(model, run), run, plan, arch.to_latent(image_vp.cpu()), schedule.sigmas, source_positive,
           negative, cfg, function=flow_inversion_sampler)
    if recorder.store is not None:
        recorder.store.wait_for_copies(device)
    recording = InversionRecording(recorder=recorder, source_steps_k=plan.source_steps_out,
                                   source_conditioning=source_positive, model=weakref.ref(model))
    return plan.inversion_out, nulls.cpu(), recording


def _same_conditioning(a, b) -> bool:
    """Two CONDITIONINGs that give the model the same inputs (the same object, or equal tensors and options)."""
    if a is b:
        return True
    try:
        ((ta, oa),), ((tb, ob),) = a, b
        if ta.shape != tb.shape or not torch.equal(ta, tb) or set(oa) != set(ob):
            return False
        for key, va in oa.items():
            vb = ob[key]
            if isinstance(va, torch.Tensor) or isinstance(vb, torch.Tensor):
                if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape == vb.shape
                        and torch.equal(va, vb)):
                    return False
            elif va is not vb and va != vb:
                return False
        return True
    except (TypeError, ValueError, RuntimeError):
        return False


def reusable_recording(inversion, model, source_positive, fraction, record_self_maps) -> InversionRecording | None:
    """The inversion's recording when the Recorder may complete it instead of running the pass: the same MODEL object
    and source prompt, a trace wanted (fraction > 0) without self maps, and nothing dropped while recording."""
    rec = getattr(inversion, "recording", None)
    if rec is None or rec.recorder.store is None or fraction <= 0 or record_self_maps:
        return None
    if rec.model() is not model or not _same_conditioning(rec.source_conditioning, source_positive):
        return None
    return rec


def _recorded_within(key: TraceKey, steps: int, windows) -> bool:
    """Whether a recorder with `windows` stores `key` (the record rules of `record_self`, `record_cross` and
    `JointSwap.record`): a recording of wider windows is cut down to a narrower one by this."""
    if key.step is None:
        return True
    if key.kind is TensorKind.SELF_OUT:
        return swap_rules.output_swap_active(key.step, steps, windows)
    if key.kind in (TensorKind.SELF_Q, TensorKind.SELF_K):
        return swap_rules.map_swap_active(key.step, steps, windows)
    return swap_rules.cross_swap_active(key.step, steps, windows)


def complete_recording(model, inversion, recording: InversionRecording, source_positive, negative, *, fraction=1.0,
                       budget_bytes=None, storage="auto", callback=None) -> SourceTrace:
    """The trace of an inversion that recorded steps 1 … N−1: those tensors (cut to `fraction`'s windows) plus step 0
    (at z_T) recorded here, one model call; equal to a full source pass's trace."""
    arch = inspect_model(model)
    schedule, n = inversion.schedule, inversion.schedule.steps
    shape = tuple(inversion.trajectory[0].shape)
    windows = swap_rules.recorded_windows(fraction)
    recorder = TraceRecorder(n, windows, False, model.load_device, budget_bytes, storage)
    if recorder.store is not None:
        for key, tensor in recording.recorder.store.tensors.items():
            if _recorded_within(key, n, windows):
                recorder.put(key, tensor)
    recorder.blend_maps = list(recording.recorder.blend_maps)
    recorder.blend_grid = recording.recorder.blend_grid
    run, nulls, device = _source_run(model, arch, source_positive, negative, shape, n, windows, recorder,
                                     inversion.null_embeddings)
    plan = SamplingPlan(scales=arch.sampler_scales(schedule.sigmas))
    plan.trajectory_k = [t.to(device, torch.float32) * plan.scales[i] for i, t in enumerate(inversion.trajectory[:2])]
    sample(patch_model(model, run), run, plan, arch.to_latent(plan.trajectory_k[0].cpu()), schedule.sigmas[:2],
           source_positive, negative, inversion.settings.cfg, callback)
    steps = plan.source_steps_out[:1] + list(recording.source_steps_k[1:])
    return _trace(model, arch, recorder, schedule, shape, inversion.trajectory, nulls, source_positive, negative,
                  inversion.settings.cfg, inversion.settings.method, fraction, False, steps, device)


def record_clip(model, source_positive, negative, schedule, cfg, *, trajectory_vp=None, start_latent_vp=None,
                null_embeddings=None, frames_per_batch=0, **options) -> SourceTrace:
    """`record_trace` over a clip, `frames_per_batch` frames at a time (frames are independent in the source pass,
    so the chunks' traces are simply joined)."""
    shape = tuple((trajectory_vp[0] if trajectory_vp is not None else start_latent_vp).shape)
    parts = frames.plan(model, shape[0], shape, frames_per_batch)
    if len(parts) == 1:
        return record_trace(model, source_positive, negative, schedule, cfg, trajectory_vp=trajectory_vp,
                            start_latent_vp=start_latent_vp, null_embeddings=null_embeddings, **options)
    traces = []
    for chunk in parts:
        part = slice(chunk.frames[0], chunk.frames[-1] + 1)
        nulls = null_embeddings if null_embeddings is None or null_embeddings.shape[1] == 1 else \
            null_embeddings[:, part]
        traces.append(record_trace(
            model, source_positive, negative, schedule, cfg, null_embeddings=nulls,
            trajectory_vp=[t[part] for t in trajectory_vp] if trajectory_vp is not None else None,
            start_latent_vp=start_latent_vp[part] if start_latent_vp is not None else None, **options))
    return SourceTrace.concat(traces)


def record_source(model, source_positive, negative, *, inversion=None, latent=None, seed=8888, steps=50, cfg=7.5,
                  fraction=1.0, record_self_maps=False, storage="auto", memory_budget_gb=0.0, callback=None,
                  frames_per_batch=0):
    """The Attention Recorder's stage: the source pass of a real photo (an inversion) or of a synthetic source
    (noise from `seed` at the size of `latent`); a clip of F frames is one trace. Returns (trace, LATENT of the
    source's final latent)."""
    import comfy.sample

    arch = inspect_model(model)
    budget = None if memory_budget_gb <= 0 else int(memory_budget_gb * 2**30)
    options = dict(fraction=fraction, record_self_maps=record_self_maps, budget_bytes=budget, storage=storage,
                   callback=callback, frames_per_batch=frames_per_batch)
    if inversion is not None:
        arch.check_same_model(model, inversion.arch, inversion.weights_fingerprint, "inversion", "the inversion",
                              "connect the same MODEL (same checkpoint and LoRAs) to the inversion and the Recorder")
        recording = reusable_recording(inversion, model, source_positive, fraction, record_self_maps)
        if recording is not None:
            trace = complete_recording(model, inversion, recording, source_positive, negative, fraction=fraction,
                                       budget_bytes=budget, storage=storage, callback=callback)
            return trace, {"samples": arch.to_latent(trace.trajectory[-1])}
        trace = record_clip(model, source_positive, negative, inversion.schedule, inversion.settings.cfg,
                            trajectory_vp=inversion.trajectory, null_embeddings=inversion.null_embeddings,
                            method=inversion.settings.method, **options)
    else:
        if latent is None:
            raise PhotoswapInputError(
                "inversion", "an inversion (real photo) or a latent (synthetic source)",
                "connect Photoswap Null-Text DDIM Inversion, or an Empty Latent Image for a synthetic source")
        samples = latent["samples"]
        arch.check_latent(samples, "latent")
        arch.check_guidance(None, cfg)
        start = comfy.sample.prepare_noise(samples, seed).float()
        trace = record_clip(model, source_positive, negative, arch.schedule(model, steps), cfg,
                            start_latent_vp=start, method="synthetic", **options)
    return trace, {"samples": arch.to_latent(trace.trajectory[-1])}
