"""The source pass (recorder) and the target pass (swap), both through ComfyUI's own sampling machinery.

Both use `comfy.sample.sample_custom` with a KSAMPLER whose function is deterministic DDIM (Euler over the DDIM
sigmas) plus the Photoswap between-step rules:
- the source row is pinned to the source trajectory; the per-step correction that pins it (trajectory[i+1] minus the
  source's own step) is added to the target row too (as target = trajectory[i+1] + (target step − source step)) — float noise for `null_text`, and for `direct` the Direct
  Inversion rule (Ju et al. 2023), so identical prompts give the source reconstruction exactly for every method;
- LocalBlend after each step from its start fraction on.
The CFG guider, ControlNet, model patches (LoRA, other packs' patches) and previews work as in any ComfyUI sampler.
"""
from __future__ import annotations

import logging
import math

import torch

from . import swap_rules
from .attention_patch import SwapRun, patch_model
from .errors import PhotoswapInputError
from .model_adapter import DirectEvaluator, inspect_model
from .trace import AttentionStore, SourceTrace

log = logging.getLogger("photoswap")


def _scales(sigmas):
    return [math.sqrt(1.0 + float(s) ** 2) for s in sigmas]


def photoswap_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, run=None, plan=None):
    """KSAMPLER function: deterministic DDIM (Euler over the DDIM sigmas) with the Photoswap between-step rules.

    x is one k-space latent row. Record: the source row (pinned to the trajectory when there is one). Target: the
    target row; in lockstep each step first runs a record call on the source row (one step's tensors, kept in
    `plan["step_recorder"]`), then the target call, the exact arithmetic of the recorded-trace mode.
    """
    import comfy.model_management

    extra_args = extra_args or {}
    run.begin_run()
    n = len(sigmas) - 1
    s_in = x.new_ones([x.shape[0]])
    traj = plan.get("trajectory_k")  # k-space source latents on the device, or None (synthetic recording)
    source_steps = plan.get("source_steps")  # recorded trace: the source's own step results (k-space)
    step_recorder = plan.get("step_recorder")  # lockstep
    if traj is not None:  # start exactly at z_T (the LATENT round trip through the scale factor rounds)
        x = traj[0].clone()
    elif plan.get("start_k") is not None:  # synthetic source: start exactly at the stored trajectory[0]
        x = plan["start_k"].clone()
    for i in range(n):
        comfy.model_management.throw_exception_if_processing_interrupted()
        run.step = i
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if run.mode == "record":
            if traj is not None:
                x = traj[i].clone()
            denoised = model(x, sigma * s_in, **extra_args)
            x_next = x + (x - denoised) / sigma * (sigma_next - sigma)
            plan.setdefault("source_steps_out", []).append(x_next.clone())
            if traj is None:
                # continue from exactly what the trace stores (VP float32, re-scaled by the swap): recorded tensors,
                # source steps and trajectory then agree bit for bit, so trace mode ≡ lockstep and identity is exact
                scale_next = plan["scales"][i + 1]  # host floats: float(sigma_next) would read the device
                x_vp = (x_next / scale_next).float()
                x_next = x_vp * scale_next
                plan.setdefault("generated_vp", []).append(x_vp.clone())
            else:
                x_next = traj[i + 1].clone()
        else:
            run.prefetch(i, x.device)
            if step_recorder is not None:
                step_recorder.begin_step()
                run.mode = "record"
                src_denoised = model(traj[i], sigma * s_in, **extra_args)
                run.mode = "target"
                source_step = traj[i] + (traj[i] - src_denoised) / sigma * (sigma_next - sigma)
            else:
                source_step = source_steps[i]
            denoised = model(x, sigma * s_in, **extra_args)
            x_next = x + (x - denoised) / sigma * (sigma_next - sigma)
            source = traj[i + 1]
            target = source + (x_next - source_step)  # exact when both rows computed the same step
            x_next, mask = run.end_step(i, source, target)
            if mask is not None:
                plan["last_mask"] = mask
        x = x_next
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
    return x


def _sample(patched, run, plan, latent_k_unscaled, sigmas, positive, negative, cfg, callback=None):
    import comfy.sample
    import comfy.samplers

    sampler = comfy.samplers.KSAMPLER(photoswap_ddim, extra_options={"run": run, "plan": plan})
    noise = torch.zeros_like(latent_k_unscaled)
    return comfy.sample.sample_custom(patched, noise, cfg, sampler, sigmas.clone(), positive, negative,
                                      latent_k_unscaled, callback=callback, disable_pbar=True)


def weights_fingerprint(model) -> str:
    """A cheap fingerprint of the diffusion weights: sums of a sample of unpatched tensors plus the weight-patch list
    (LoRA keys, strengths and the sums of the patch tensors), stable whether or not ComfyUI has the patches applied
    right now. Sums are taken in float64 on the CPU: a float32 sum depends on the thread count and the device (CPU vs
    GPU, offloaded or not) in the 7th digit, which made the same weights look different (e.g. a saved inversion loaded
    in another process)."""
    import hashlib

    def total(t):
        t = t.detach().to("cpu", torch.float64)
        return f"{tuple(t.shape)}:{float(t.sum()):.6e}:{float(t.abs().sum()):.6e}"

    def patch_tensors(obj, depth=0):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif depth < 4 and isinstance(obj, (tuple, list)):
            for item in obj:
                yield from patch_tensors(item, depth + 1)
        elif depth < 4 and isinstance(getattr(obj, "weights", None), (tuple, list)):  # LoRAAdapter & co.
            yield from patch_tensors(obj.weights, depth + 1)

    h = hashlib.sha256()
    patches = getattr(model, "patches", {})
    sd = model.model.diffusion_model.state_dict()
    keys = [k for k in sorted(sd.keys()) if f"diffusion_model.{k}" not in patches]
    for key in keys[:: max(1, len(keys) // 16)]:
        h.update(key.encode())
        h.update(total(sd[key]).encode())
    for key in sorted(patches.keys()):
        h.update(str(key).encode())
        for p in patches[key]:
            h.update(f"{p[0]}:{p[2]}:".encode())
            h.update(":".join(total(t) for t in patch_tensors(p[1])).encode())
    return h.hexdigest()[:16]


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

    def record_self(self, i, layer, chunks, q, k, out, level):
        if self.store is None:
            return
        if swap_rules.output_swap_active(i, self.steps, self.windows):
            for ci, c in enumerate(chunks):
                self.store.put(("out", i, layer, c), out[ci:ci + 1])
        if (self.record_self_maps and 0 in chunks and swap_rules.map_swap_active(i, self.steps, self.windows)
                and swap_rules.self_map_layer(level)):
            ci = chunks.index(0)
            self.store.put(("q", i, layer), q[ci])
            self.store.put(("k", i, layer), k[ci])
        self._check_budget()

    def record_cross(self, i, layer, q_cond, k_cond, maps, grid):
        if self.store is not None and swap_rules.cross_swap_active(i, self.steps, self.windows):
            self.store.put(("cq", i, layer), q_cond)
            if not self.store.has(("ck", layer)):
                self.store.put(("ck", layer), k_cond)
            self._check_budget()
        if maps is not None:
            layer_map = maps.mean(1)[0].float()
            self.blend_maps[i] = layer_map if self.blend_maps[i] is None else self.blend_maps[i] + layer_map
            self.blend_grid = grid


def check_latent(samples: torch.Tensor, input_name: str, downscale: int = 8):
    if samples.dim() != 4:
        raise PhotoswapInputError(input_name, f"an image LATENT [1, 4, h, w] (got shape {tuple(samples.shape)})",
                                  "connect VAE Encode / Empty Latent Image of an SD1.x/SD2.x/SDXL model")
    if samples.shape[0] != 1:
        raise PhotoswapInputError(
            input_name, f"a latent batch of 1 (got {samples.shape[0]})",
            "Photoswap processes one image per run; split the batch (e.g. Latent From Batch) and run each image")
    if samples.shape[1] != 4:
        raise PhotoswapInputError(input_name, f"4 latent channels (got {samples.shape[1]})",
                                  "use an SD1.x/SD2.x/SDXL VAE; other latent spaces are not supported")
    if not torch.isfinite(samples).all():
        raise PhotoswapInputError(input_name, "finite latent values (found NaN or Inf)",
                                  "check the image and the VAE (an fp16 VAE overflow gives NaN; try --fp32-vae)")


def model_prompt(model, conditioning, input_name: str):
    """The single CONDITIONING entry of `conditioning`, checked to have the width the model's cross-attention
    expects (the same family's CLIP); else the UNet would fail with a raw shape error deep inside sampling."""
    from .model_adapter import single_conditioning

    entry = single_conditioning(conditioning, input_name)
    config = getattr(getattr(model, "model", None), "model_config", None)
    context_dim = getattr(config, "unet_config", {}).get("context_dim") if config is not None else None
    width = int(entry[0].shape[-1])
    if context_dim is not None and width != int(context_dim):
        raise PhotoswapInputError(
            input_name, f"a prompt encoded by this model's CLIP ({context_dim} values per token; this one has "
                        f"{width})",
            "encode the prompts with the CLIP of the same checkpoint (or Concept Loader) as the MODEL: SD1.x prompts "
            "have 768 values per token, SD2.x 1024, SDXL 2048")
    return entry


def record_trace(model, source_positive, negative, schedule, cfg, *, trajectory_vp=None, start_latent_vp=None,
                 null_embeddings=None, method="synthetic", fraction=1.0, record_self_maps=False, budget_bytes=None,
                 storage="auto", callback=None) -> SourceTrace:
    """Run the source pass and build a SourceTrace (real image: trajectory given; synthetic: start latent given)."""
    import comfy.model_management as mm

    info = inspect_model(model)
    src_entry = model_prompt(model, source_positive, "source_positive")
    neg_entry = model_prompt(model, negative, "negative")
    shape = tuple((trajectory_vp[0] if trajectory_vp is not None else start_latent_vp).shape)
    evaluator = DirectEvaluator(model, shape)
    device = evaluator.device
    n = schedule.steps
    if null_embeddings is None:
        ctx = evaluator.model_kwargs(neg_entry)["c_crossattn"].float()
        null_embeddings = ctx.unsqueeze(0).expand(n, *ctx.shape).clone()
    scales = _scales(schedule.sigmas)
    windows = swap_rules.recorded_windows(fraction)
    recorder = TraceRecorder(n, windows, record_self_maps, device, 0 if fraction <= 0 else budget_bytes, storage)
    run = SwapRun("record", n, windows, null_embeddings=null_embeddings.to(device), recorder=recorder,
                  source_kwargs=evaluator.model_kwargs(src_entry),
                  uncond_kwargs=_y_only(evaluator.model_kwargs(neg_entry)))
    plan = {"trajectory_k": None, "scales": scales}
    if trajectory_vp is not None:
        plan["trajectory_k"] = [t.to(device, torch.float32) * scales[i] for i, t in enumerate(trajectory_vp)]
        start = plan["trajectory_k"][0]
    else:
        start = start_latent_vp.to(device, torch.float32) * scales[0]
        plan["start_k"] = start
    needs_pass = trajectory_vp is None or recorder.store is not None
    if needs_pass:
        patched = patch_model(model, run)
        _sample(patched, run, plan, start.cpu() / info.latent_scale, schedule.sigmas, source_positive, negative,
                cfg, callback)
    if trajectory_vp is None:
        trajectory_vp = [start_latent_vp.float().cpu()] + [g.cpu() for g in plan["generated_vp"]]
    trace = SourceTrace(
        schedule=schedule, model_info=info, latent_shape=shape,
        trajectory=[t.detach().float().cpu() for t in trajectory_vp],
        null_embeddings=null_embeddings.detach().float().cpu(), source_conditioning=source_positive,
        negative_conditioning=negative, cfg=cfg, method=method,
        record_fraction=fraction if recorder.store is not None else 0.0,
        weights_fingerprint=weights_fingerprint(model),
        blend_maps=[m.cpu() if m is not None else None for m in recorder.blend_maps], blend_grid=recorder.blend_grid,
        store=recorder.store, self_maps_recorded=record_self_maps and recorder.store is not None,
        dropped_reason=recorder.dropped_reason,
        source_steps_k=[c.detach().cpu() for c in plan["source_steps_out"]] if needs_pass else None)
    if recorder.store is not None:
        recorder.store.wait_for_copies(device)
    mm.soft_empty_cache()
    return trace


def _y_only(kwargs: dict) -> dict:
    return {"y": kwargs["y"]} if "y" in kwargs else {}


def check_trace_matches(model, trace: SourceTrace, input_name="trace"):
    info = inspect_model(model)
    if info.family != trace.model_info.family or info.prediction != trace.model_info.prediction:
        raise PhotoswapInputError(
            input_name, f"a trace recorded with a {info.family}/{info.prediction} model like this one (it was "
                        f"recorded with {trace.model_info.family}/{trace.model_info.prediction})",
            "connect the same MODEL to the Attention Recorder and the Swap Sampler")
    fingerprint = weights_fingerprint(model)
    if fingerprint != trace.weights_fingerprint:
        raise PhotoswapInputError(
            input_name, "a trace recorded with this model's weights (the weights fingerprint differs)",
            "connect the same MODEL (same checkpoint and LoRAs) to the Recorder and the Swap Sampler")


def swap(model, trace: SourceTrace, target_positive, negative, prompts, windows, cfg, lockstep=False,
         callback=None, events=None):
    """The target pass. Returns (target VP latent, source VP latent, blend mask [1,1,H,W] or None, mode)."""
    check_trace_matches(model, trace)
    info = trace.model_info
    model_prompt(model, target_positive, "target_positive")
    model_prompt(model, negative, "negative")
    if trace.method == "null_text" and cfg == 1.0:
        raise PhotoswapInputError(
            "cfg", "cfg > 1 with a null-text inversion (its optimised null embeddings act only through the "
                   "unconditional branch, which ComfyUI skips at cfg 1)",
            f"use the inversion's cfg ({trace.cfg:g}), or invert with method 'direct' for cfg 1")
    windows.validate(trace.record_fraction if (trace.has_attention and not lockstep) else None)
    if trace.method == "null_text" and abs(cfg - trace.cfg) > 1e-6:
        log.warning("Photoswap: sampling at cfg %.2f but the null-text embeddings were optimised for cfg %.2f",
                    cfg, trace.cfg)
    mode = "target" if trace.has_attention and not lockstep else "lockstep"
    if mode == "target" and windows.self_map > 0 and not trace.self_maps_recorded:
        log.warning("Photoswap: the trace holds no self-attention maps (record_self_maps was off); running lockstep")
        mode = "lockstep"
    if mode == "target" and abs(cfg - trace.cfg) > 1e-9:
        log.warning("Photoswap: cfg %.2f differs from the trace's %.2f; running lockstep", cfg, trace.cfg)
        mode = "lockstep"
    evaluator = DirectEvaluator(model, trace.latent_shape)
    device = evaluator.device
    neg_entry = trace.negative_conditioning[0]
    scales = _scales(trace.schedule.sigmas)
    plan = {"trajectory_k": [t.to(device) * scales[i] for i, t in enumerate(trace.trajectory)]}
    if mode == "lockstep":
        step_recorder = TraceRecorder(trace.steps, windows, True, device, storage="device")
        plan["step_recorder"] = step_recorder
        source_store, source_blend_maps = step_recorder.store, step_recorder.blend_maps
    else:
        plan["source_steps"] = [c.to(device) for c in trace.source_steps_k]
        source_store = trace.store
        # on the device once here: the per-step LocalBlend reads them, and a host-to-device copy there would block
        source_blend_maps = [m.to(device) if m is not None else None for m in trace.blend_maps]
    run = SwapRun("target", trace.steps, windows, source_store=source_store, source_blend_maps=source_blend_maps,
                  prompts=prompts, null_embeddings=trace.null_embeddings.to(device),
                  source_kwargs=evaluator.model_kwargs(trace.source_conditioning[0]),
                  uncond_kwargs=_y_only(evaluator.model_kwargs(neg_entry)), recorder=plan.get("step_recorder"),
                  device=device)
    run.events = events
    start = plan["trajectory_k"][0]
    patched = patch_model(model, run)
    try:
        out = _sample(patched, run, plan, start.cpu() / info.latent_scale, trace.schedule.sigmas, target_positive,
                      negative, cfg, callback)
    finally:
        if source_store is not None:
            source_store.release_staged()
    final_scale = scales[-1]
    target = out[-1:] / final_scale
    # the same arithmetic as the target row's path (k-space → LATENT → VP), so equal rows give equal outputs
    source = (plan["trajectory_k"][-1].to(out.device) / info.latent_scale) / final_scale
    mask = plan.get("last_mask")
    return target, source, mask, mode
