#!/usr/bin/env python
"""Photoswap benchmark suite: every stage side by side in ONE process, as ratios to a plain sampling pass.

    .venv/bin/python bench/run_bench.py --family tiny --size 64 --steps 50           # seconds, CPU
    .venv/bin/python bench/run_bench.py --family sd15 --size 64 --steps 50           # full SD1.5 architecture, CPU
    .venv/bin/python bench/run_bench.py --family sd15 --size 512 --device cuda       # on a GPU
    .venv/bin/python bench/run_bench.py --family sdxl --size 1024 --device cuda

Stages (all under `torch.inference_mode()`, as ComfyUI's executor runs nodes; models are loaded inside it too, so
their weights are inference tensors exactly as in the server):

- `plain` (the unit): ComfyUI's stock KSampler path, `nodes.common_ksampler(sampler "ddim", scheduler
  "ddim_uniform")`, N steps, CFG 7.5 — i.e. N UNet calls on a 2-row (cond + uncond) batch.
- `plain_custom`: `comfy.sample.sample_custom` with KSAMPLER "euler" over our DDIM sigmas (arch.ddim.ddim_schedule),
  the exact sampling path (minus the Photoswap function and patches) the recorder and the swap use.
- `inversion_<method>` for ddim, negative_prompt, direct, null_text (`run_inversion`; null_text with
  `--inner-iterations`, early stop as in the reference).
- `record`: `record_trace` with a real-image trajectory (the direct inversion's), recording fraction 1.0.
- `swap_trace`: `swap` with that recorded trace; `swap_lockstep`: `swap` in lockstep with a trace recorded at
  fraction 0 (no attention tensors; what the graph runs when the trace does not fit the budget).
- `e2e_<method>`: the real-image swap, one continuous timer over run_inversion → record_trace → swap;
  `e2e_<method>_lockstep`: run_inversion + record_trace(fraction 0) + lockstep swap (the inversion is the same run as
  in `e2e_<method>`: its time is counted once for each row, it is not re-run).

With `--clip-frames F`, bench_clips.py's clip report (frame-to-frame consistency with frame_attention off / first /
keyframes, per-frame cost as a ratio to one image) runs after the suite on the same models.

Peak memory per stage: CUDA: `torch.cuda.max_memory_allocated` (reset between stages). CPU: the process's peak RSS
(VmHWM from /proc/self/status, reset between stages by writing 5 to /proc/self/clear_refs — exact, no sampling);
where that is unavailable, psutil RSS sampled every 5 ms in a background thread. Both the absolute peak (model
weights included) and the increase over the memory at the stage's start are reported.

Everything is warmed up once (each code path at 2 steps) before measuring. Model evaluations per stage are counted
with a forward pre-hook on the UNet (calls, batch rows, rows with autograd), to tell what a ratio should be from the
work alone (`ideal`) from overhead.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
for _path in (REPO_ROOT, BENCH_DIR):  # append, never prepend: our nodes/ must not shadow ComfyUI's nodes.py
    if str(_path) not in sys.path:
        sys.path.append(str(_path))

# plain passes, inversion passes, model loading, UNet counting and machine info come from the inversion benchmark
import bench_inversion as bi  # noqa: E402

SOURCE_PROMPT, SUBJECT, CONCEPT = "a photo of a cat sitting on a sofa", "cat", "sks dog"
CFG = 7.5
FAMILIES = ("tiny", "tiny-sdxl", "sd15", "sd21-v", "sdxl")
METHODS = ("ddim", "negative_prompt", "direct", "null_text")

# DESIGN.md §6: ratio to the plain pass.
TARGETS = {"swap_trace": 1.15, "swap_lockstep": 2.0, "inversion_direct": 0.7, "inversion_null_text": 6.0}

STAGE_ORDER = [
    ("plain", "plain sampling, KSampler ddim (unit)"),
    ("plain_custom", "plain, sample_custom euler/DDIM sigmas"),
    ("inversion_ddim", "inversion ddim"),
    ("inversion_negative_prompt", "inversion negative_prompt"),
    ("inversion_direct", "inversion direct"),
    ("inversion_null_text", "inversion null_text"),
    ("record", "recorder (trace, fraction 1.0)"),
    ("swap_trace", "swap sampler, recorded trace"),
    ("swap_lockstep", "swap sampler, lockstep"),
    ("e2e_direct", "e2e direct: inversion+recorder+swap"),
    ("e2e_direct_lockstep", "e2e direct, lockstep swap"),
    ("e2e_null_text", "e2e null_text: inversion+recorder+swap"),
    ("e2e_null_text_lockstep", "e2e null_text, lockstep swap"),
]


_T0 = time.perf_counter()


def log(text):
    print(f"[bench {time.perf_counter() - _T0:7.1f}s] {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------- memory

def _read_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class MemoryMeter:
    """Peak memory between `lap()` calls: CUDA allocator peak, Linux VmHWM, or sampled RSS."""

    def __init__(self, device):
        import torch

        self.device = device
        self.cuda = device.type == "cuda"
        self._thread = None
        if self.cuda:
            self.method = "torch.cuda.max_memory_allocated (reset per stage)"
        elif _read_hwm_bytes() is not None and _reset_hwm():
            self.method = "peak RSS: /proc/self/status VmHWM, reset per stage via /proc/self/clear_refs"
        else:
            self.method = "peak RSS: psutil sampled every 5 ms in a background thread"
            self._peak = 0
            self._stop = threading.Event()
            self._lock = threading.Lock()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._torch = torch
        self.start_bytes = self.current()
        self.lap()

    def _sample(self):
        while not self._stop.wait(0.005):
            rss = _rss_bytes()
            with self._lock:
                self._peak = max(self._peak, rss)

    def current(self) -> int:
        if self.cuda:
            return int(self._torch.cuda.memory_allocated(self.device))
        return _rss_bytes()

    def lap(self) -> tuple[int, int]:
        """(peak bytes since the last lap, bytes in use at the last lap); starts a new interval."""
        start = self.start_bytes
        if self.cuda:
            self._torch.cuda.synchronize(self.device)
            peak = int(self._torch.cuda.max_memory_allocated(self.device))
            self._torch.cuda.reset_peak_memory_stats(self.device)
        elif self._thread is None:
            peak = _read_hwm_bytes()
            _reset_hwm()
        else:
            with self._lock:
                peak = max(self._peak, _rss_bytes())
                self._peak = 0
        self.start_bytes = self.current()
        return peak, start

    def close(self):
        if self._thread is not None:
            self._stop.set()


# ------------------------------------------------------------------------------------------------------- timing

class Bench:
    """Measures stages (time, memory, UNet work) in one process; `measure` nests sub-stages via `lap` boundaries."""

    def __init__(self, device, diffusion_model):
        import torch

        self.torch = torch
        self.device = device
        self.memory = MemoryMeter(device)
        self.counter = bi.UNetCounter(diffusion_model)
        self.results: dict = {}

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def run(self, name, fn, record=True):
        """Run fn() as one stage: returns (fn's result, stage dict); stores the dict under `name` when `record`."""
        self.sync()
        self.memory.lap()
        self.counter.reset()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        seconds = time.perf_counter() - t0
        peak, start = self.memory.lap()
        stage = {"seconds": seconds, "peak_bytes": peak, "start_bytes": start,
                 "peak_increase_bytes": max(0, peak - start)}
        stage.update(self.counter.snapshot())
        if record:
            self.keep(name, stage)
        log(f"{name}: {seconds:.3f} s, {stage['unet_calls']} UNet calls")
        return out, stage


    def keep(self, name, stage):
        """Store a stage; with repeats keep the fastest sample (seconds list kept) and the largest memory peak."""
        old = self.results.get(name)
        samples = (old.get("samples", []) if old else []) + [stage["seconds"]]
        best = stage if old is None or "error" in old or stage["seconds"] < old["seconds"] else dict(old)
        if old is not None and "error" not in old:
            best["peak_bytes"] = max(old["peak_bytes"], stage["peak_bytes"])
            best["peak_increase_bytes"] = max(old["peak_increase_bytes"], stage["peak_increase_bytes"])
        best["samples"] = samples
        self.results[name] = best


def combine(*stages) -> dict:
    """A stage made of consecutive measured pieces: times and UNet work add, memory peaks take the max."""
    out = {"seconds": sum(s["seconds"] for s in stages), "peak_bytes": max(s["peak_bytes"] for s in stages),
           "start_bytes": stages[0]["start_bytes"]}
    out["peak_increase_bytes"] = max(0, out["peak_bytes"] - out["start_bytes"])
    for key in ("unet_calls", "unet_rows", "unet_rows_with_grad"):
        out[key] = sum(s[key] for s in stages)
    return out


# -------------------------------------------------------------------------------------------------- environment

def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def set_unet_dtype(dtype_name: str) -> None:
    """--dtype: ComfyUI's own switches (`--fp16-unet`, `--bf16-unet`, `--fp32-unet`), set before loading."""
    from comfy.cli_args import args

    if dtype_name != "auto":
        setattr(args, f"{dtype_name}_unet", True)


def model_dtype_text(model) -> str:
    base = model.model
    dtype = str(base.get_dtype()).replace("torch.", "")
    cast = getattr(base, "manual_cast_dtype", None)
    return f"{dtype} (manual cast to {str(cast).replace('torch.', '')})" if cast is not None else dtype


# --------------------------------------------------------------------------------------------------- the suite

class Suite:
    """The stages as calls; plain passes and inversions are bench_inversion's, the swap stages are the core's."""

    def __init__(self, model, clip, latent, steps: int, inner_iterations: int, windows):
        import torch

        from comfyui_photoswap.photoswap_core.prompts import build_prompt_pair

        self.model, self.clip = model, clip
        self.steps, self.inner = steps, inner_iterations
        self.windows = windows
        self.src = bi.encode(clip, SOURCE_PROMPT)
        self.neg = bi.encode(clip, "")
        self.prompts = build_prompt_pair(clip, SOURCE_PROMPT, SUBJECT, CONCEPT)
        self.tgt = bi.encode(clip, self.prompts.target_prompt)
        self.latent = latent  # the VAE-encoded synthetic photo (bench_inversion.load_models)
        self.empty = {"samples": torch.zeros_like(latent["samples"])}

    # -- stages
    def plain(self, steps):
        return bi.plain_pass(self.model, self.tgt, self.neg, self.empty, steps)

    def plain_custom(self, steps):
        return bi.plain_custom_pass(self.model, self.tgt, self.neg, self.empty, steps)

    def invert(self, method, steps, inner=None):
        return bi.inversion_pass(self.model, self.src, self.neg, self.latent, method, steps,
                                 self.inner if inner is None else inner)

    def record(self, inversion, fraction=1.0):
        from comfyui_photoswap.photoswap_core.recorder import record_trace

        return record_trace(self.model, self.src, self.neg, inversion.schedule, inversion.settings.cfg,
                            trajectory_vp=inversion.trajectory, null_embeddings=inversion.null_embeddings,
                            method=inversion.settings.method, fraction=fraction,
                            record_self_maps=self.windows.self_map > 0)

    def swap(self, trace, lockstep):
        from comfyui_photoswap.photoswap_core.swap_sampler import swap

        result = swap(self.model, trace, self.tgt, self.neg, self.prompts, self.windows, CFG, lockstep=lockstep)
        expected = "lockstep" if lockstep or not trace.has_attention else "target"
        if result.mode != expected:
            raise RuntimeError(f"the swap ran in mode {result.mode!r}, expected {expected!r}")
        return result.target

    def warm_up(self):
        """Each code path once at 2 steps (allocations, kernel selection, lazy imports, first-call caches)."""
        self.plain(2)
        self.plain_custom(2)
        for method in METHODS:
            inv = self.invert(method, 2, inner=1)
        self.swap(self.record(inv), lockstep=False)
        self.swap(self.record(inv, 0.0), lockstep=True)


def guarded(results: dict, names: list, fn):
    """Run fn(); on an exception mark each stage of `names` that has no result as failed, and go on."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001  (a benchmark reports a failing stage and measures the rest)
        text = f"{type(exc).__name__}: {exc}"
        log(f"FAILED {names[0]}: {text}\n{traceback.format_exc()}")
        for name in names:
            results.setdefault(name, {"error": text})
        return None


def _trace_nbytes(trace) -> int:
    """trace.nbytes(); a trace recorded without a pass (fraction 0) has None blend maps, counted as 0 bytes."""
    try:
        return trace.nbytes()
    except AttributeError:  # SourceTrace.nbytes() did not skip None blend maps
        maps = sum(m.numel() * m.element_size() for m in trace.blend_maps if m is not None)
        total = sum(t.numel() * t.element_size() for t in trace.trajectory) + maps
        total += trace.null_embeddings.numel() * trace.null_embeddings.element_size()
        return total + (trace.store.nbytes if trace.store is not None else 0)


def run_pipeline(bench: Bench, suite: Suite, method: str, prefix: str) -> dict:
    """inversion → recorder → swap (trace), then recorder(fraction 0) → lockstep swap, each piece measured."""
    inv, s_inv = bench.run(f"inversion_{method}", lambda: suite.invert(method, suite.steps))
    trace, s_rec = bench.run(f"{prefix}record", lambda: suite.record(inv))
    _, s_swap = bench.run(f"{prefix}swap_trace", lambda: suite.swap(trace, lockstep=False))
    empty, s_rec0 = bench.run(f"{prefix}record_fraction0", lambda: suite.record(inv, 0.0))
    _, s_lock = bench.run(f"{prefix}swap_lockstep", lambda: suite.swap(empty, lockstep=True))
    bench.keep(f"e2e_{method}", combine(s_inv, s_rec, s_swap))
    bench.keep(f"e2e_{method}_lockstep", combine(s_inv, s_rec0, s_lock))
    info = {"trace_nbytes": _trace_nbytes(trace), "trace_store_nbytes": trace.store.nbytes if trace.store else 0,
            "trace_store_tensors": len(trace.store.tensors) if trace.store else 0,
            "trace_store_location": str(trace.store.location) if trace.store else None,
            "trace_fraction0_nbytes": _trace_nbytes(empty), "trace_dropped_reason": trace.dropped_reason}
    if method == "null_text":
        info["null_text_inner_iterations"] = list(inv.inner_iterations)
    del trace, empty
    return info


def null_text_at_cap(bench: Bench, suite: Suite, cap: int, steps: int) -> list:
    """The null_text inversion alone with at most `cap` inner iterations per step; returns the iterations run."""
    inv, _ = bench.run(f"inversion_null_text_cap{cap}", lambda: suite.invert("null_text", steps, inner=cap))
    return list(inv.inner_iterations)


def ideal_ratio(stage: dict, unit: dict) -> float | None:
    """UNet work of the stage relative to the unit, counting a row with autograd as 3 (forward + backward ≈ 2×)."""
    if not unit.get("unet_rows"):
        return None
    work = stage["unet_rows"] + 2 * stage["unet_rows_with_grad"]
    return work / unit["unet_rows"]


def run_suite(args) -> dict:
    if args.device == "cuda":
        os.environ["PHOTOSWAP_DEVICE"] = "cuda"
    elif args.device == "cpu":
        os.environ["PHOTOSWAP_DEVICE"] = "cpu"
    from devtools.comfy_env import bootstrap

    bootstrap()
    log("ComfyUI imported")
    import comfy.model_management as mm
    import comfy.utils
    import torch

    from comfyui_photoswap.photoswap_core.swap_rules import SwapWindows

    if args.threads:
        torch.set_num_threads(args.threads)
    comfy.utils.PROGRESS_BAR_ENABLED = False
    device = mm.get_torch_device()
    if args.device == "cuda" and device.type != "cuda":
        raise SystemExit(f"--device cuda requested but ComfyUI picked {device} (no CUDA available?)")
    w = [float(v) for v in args.windows.split(",")]
    windows = SwapWindows(self_output=w[0], self_map=w[1], cross_map=w[2])
    windows.validate()

    set_unet_dtype(args.dtype)
    t_load = time.perf_counter()
    # "inference": weights loaded inside inference mode, i.e. inference tensors, as ComfyUI's executor loads them
    with torch.inference_mode() if args.weights == "inference" else contextlib.nullcontext():
        model, clip, _vae, latent = bi.load_models(args.family, args.size)
        mm.load_models_gpu([model])
    load_seconds = time.perf_counter() - t_load
    log(f"model loaded in {load_seconds:.1f} s")
    machine = bi.machine_info(device.type)
    meta = {
        "family": args.family, "model": type(model.model.model_config).__name__, "size": args.size,
        "latent": [args.size // 8, args.size // 8], "steps": args.steps, "cfg": CFG,
        "inner_iterations": args.inner_iterations, "device": device.type,
        "device_name": machine.get("gpu") if device.type == "cuda" else machine.get("cpu"),
        "dtype": model_dtype_text(model), "torch": torch.__version__, "comfyui": machine.get("comfyui"),
        "python": platform.python_version(), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "ram_gb": machine.get("ram_gb"), "cuda": machine.get("cuda"),
        "attention": "PyTorch SDPA (--use-pytorch-cross-attention)",
        "model_load": "bench_inversion.load_models: tiny = devtools.tiny_models.build_tiny; else the cached random "
                      "checkpoint via comfy.sd.load_checkpoint_guess_config (CheckpointLoaderSimple's loader)",
        "weights": ("inference tensors (loaded inside torch.inference_mode, as in the server)"
                    if args.weights == "inference" else "normal tensors (loaded outside inference mode)"),
        "model_load_seconds": round(load_seconds, 2), "windows": {"self_output": windows.self_output,
                                                                  "self_map": windows.self_map,
                                                                  "cross_map": windows.cross_map,
                                                                  "local_blend": windows.local_blend},
        "prompts": [SOURCE_PROMPT, SUBJECT, CONCEPT], "repeat": args.repeat,
        "statistic": "fastest of the repetitions" if args.repeat > 1 else "single run",
        "unit": "nodes.common_ksampler(sampler 'ddim', scheduler 'ddim_uniform', cfg 7.5): stock KSampler path",
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "git_commit": git_commit(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
    }
    with torch.inference_mode():
        suite = Suite(model, clip, latent, args.steps, args.inner_iterations, windows)
        bench = Bench(device, model.model.diffusion_model)
        meta["memory_method"] = bench.memory.method
        meta["model_memory_bytes"] = bench.memory.current()
        t0 = time.perf_counter()
        suite.warm_up()
        meta["warm_up_seconds"] = round(time.perf_counter() - t0, 2)
        log(f"warmed up in {meta['warm_up_seconds']} s")
        details = {}
        for repeat in range(args.repeat):
            if args.repeat > 1:
                log(f"repetition {repeat + 1} of {args.repeat}")
            bench.run("plain", lambda: suite.plain(args.steps))
            guarded(bench.results, ["plain_custom"],
                    lambda: bench.run("plain_custom", lambda: suite.plain_custom(args.steps)))
            for method in ("ddim", "negative_prompt"):
                guarded(bench.results, [f"inversion_{method}"],
                        lambda m=method: bench.run(f"inversion_{m}", lambda: suite.invert(m, args.steps)))
            for method, prefix in (("direct", ""), ("null_text", "null_text_")):
                if method == "null_text" and args.skip_null_text:
                    continue
                names = [f"inversion_{method}", f"e2e_{method}", f"e2e_{method}_lockstep"]
                if method == "direct":
                    names += ["record", "swap_trace", "swap_lockstep"]
                info = guarded(bench.results, names, lambda m=method, p=prefix: run_pipeline(bench, suite, m, p))
                if info is not None:
                    details[method] = info
            for cap in args.null_text_caps:
                iterations = guarded(bench.results, [f"inversion_null_text_cap{cap}"],
                                     lambda k=cap: null_text_at_cap(bench, suite, k, args.steps))
                if iterations is not None:
                    details.setdefault("null_text_caps", {})[str(cap)] = iterations
        if args.profile:  # separate, untimed runs: cProfile slows Python-heavy code down
            profile_stages(Profiler(args.profile), suite, args.steps)
        sync_debug = None
        if args.sync_debug and device.type == "cuda":
            sync_debug = guarded({}, ["sync_debug"], lambda: sync_debug_stages(suite, args.steps))
        clips = None
        if args.clip_frames:  # bench_clips.py's temporal report on the same models, in the same process
            import bench_clips

            clips = guarded({}, ["clips"], lambda: bench_clips.measure(model, clip, _vae, args.size, args.clip_frames,
                                                                       args.steps, device=device.type))
        meta["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    del _vae
    unit = bench.results["plain"]
    stages = {}
    for name, stage in bench.results.items():
        stage = dict(stage)
        if "error" in stage:
            stages[name] = stage
            continue
        stage["ratio"] = stage["seconds"] / unit["seconds"]
        stage["ideal_ratio"] = ideal_ratio(stage, unit)
        if name in TARGETS:
            stage["target_ratio"] = TARGETS[name]
            stage["meets_target"] = stage["ratio"] <= TARGETS[name]
        stages[name] = stage
    trace_info = details.get("direct") or {}
    errors = {name: stage["error"] for name, stage in stages.items() if "error" in stage}
    result = {"meta": meta, "stages": stages, "trace": trace_info, "pipelines": details, "errors": errors}
    if sync_debug is not None:
        result["cuda_sync_debug"] = sync_debug
    if clips is not None:
        result["clips"] = clips
    elif args.clip_frames:
        errors["clips"] = "the clip benchmark failed (log above)"
    return result


def profile_stages(profiler, suite, steps):
    with profiler.stage("plain"):
        suite.plain(steps)
    with profiler.stage("plain_custom"):
        suite.plain_custom(steps)
    inv = suite.invert("direct", steps)
    trace, empty = suite.record(inv), suite.record(inv, 0.0)
    with profiler.stage("record"):
        suite.record(inv)
    with profiler.stage("swap_trace"):
        suite.swap(trace, lockstep=False)
    with profiler.stage("swap_lockstep"):
        suite.swap(empty, lockstep=True)


def sync_debug_stages(suite, steps) -> dict:
    """CUDA only: run plain, record, swap_trace and swap_lockstep once more under `torch.cuda.set_sync_debug_mode`
    ("warn") and count the host-device synchronisations per stage and per source line (untimed runs)."""
    import collections
    import warnings

    import torch

    inv = suite.invert("direct", steps)
    trace, empty = suite.record(inv), suite.record(inv, 0.0)
    calls = {"plain": lambda: suite.plain(steps), "record": lambda: suite.record(inv),
             "swap_trace": lambda: suite.swap(trace, lockstep=False),
             "swap_lockstep": lambda: suite.swap(empty, lockstep=True)}
    out = {}
    for name, fn in calls.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        sites = collections.Counter(f"{w.filename}:{w.lineno}" for w in caught
                                    if "synchroniz" in str(w.message).lower())
        out[name] = {"syncs": sum(sites.values()), "per_step": sum(sites.values()) / steps,
                     "sites": dict(sites.most_common(20))}
        log(f"sync debug {name}: {out[name]['syncs']} synchronising calls")
    return out


class Profiler:
    """cProfile of chosen stages into DIR/<stage>.prof plus a text summary (top functions by self and cumulative)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def stage(self, name):
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        try:
            yield
        finally:
            prof.disable()
            prof.dump_stats(str(self.folder / f"{name}.prof"))
            text = io.StringIO()
            stats = pstats.Stats(prof, stream=text)
            stats.sort_stats("tottime").print_stats(40)
            stats.sort_stats("cumulative").print_stats(60)
            (self.folder / f"{name}.txt").write_text(text.getvalue())


# ------------------------------------------------------------------------------------------------------ output

def _mb(n) -> str:
    return f"{n / 2**20:,.0f} MB"


def format_table(result: dict) -> str:
    meta, stages = result["meta"], result["stages"]
    lines = [
        f"# Photoswap benchmark: family {meta['family']}, {meta['size']}x{meta['size']} px (latent "
        f"{meta['latent'][0]}x{meta['latent'][1]}), {meta['steps']} steps, cfg {meta['cfg']}, null_text inner "
        f"iterations ≤ {meta['inner_iterations']}",
        f"# device: {meta['device']} — {meta['device_name']} (torch threads {meta['torch_threads']}, "
        f"{meta['cpu_count']} CPUs); dtype {meta['dtype']}",
        f"# torch {meta['torch']}, ComfyUI {meta['comfyui']}, Python {meta['python']}, attention {meta['attention']}",
        f"# memory: {meta['memory_method']}; load average at start "
        f"{', '.join(f'{v:.2f}' for v in meta['load_average_start'] or [])}, at end "
        f"{', '.join(f'{v:.2f}' for v in meta.get('load_average_end') or [])}",
        f"# seconds: {meta['statistic']} ({meta['repeat']} run{'s' if meta['repeat'] > 1 else ''} of every stage)",
        f"# unit: {meta['unit']}",
        "",
        f"{'stage':<40} {'seconds':>9} {'ratio':>7} {'target':>10} {'ideal':>6} {'UNet rows':>9} "
        f"{'peak mem':>10} {'+ over start':>12}",
    ]
    caps = sorted((int(name.rsplit("cap", 1)[1]), name) for name in stages if name.startswith("inversion_null_text_cap"))
    for name, label in STAGE_ORDER + [(name, f"inversion null_text, ≤ {k} it/step") for k, name in caps]:
        s = stages.get(name)
        if s is None:
            continue
        if "error" in s:
            lines.append(f"{label:<40} FAILED: {s['error'][:80]}")
            continue
        target = f"≤ {s['target_ratio']:g}" + (" ok" if s["meets_target"] else " NO") if "target_ratio" in s else ""
        ideal = f"{s['ideal_ratio']:.2f}" if s.get("ideal_ratio") is not None else ""
        lines.append(f"{label:<40} {s['seconds']:>9.3f} {s['ratio']:>6.2f}x {target:>10} {ideal:>6} "
                     f"{s['unet_rows'] + 2 * s['unet_rows_with_grad']:>9} {_mb(s['peak_bytes']):>10} "
                     f"{_mb(s['peak_increase_bytes']):>12}")
    t = result["trace"]
    if t:
        lines += ["", f"trace: {t['trace_nbytes']:,} bytes in all (trace.nbytes()); attention store "
                  f"{t['trace_store_nbytes']:,} bytes in {t['trace_store_tensors']} tensors on "
                  f"{t['trace_store_location']}; fraction-0 trace (lockstep) {t['trace_fraction0_nbytes']:,} bytes"]
    nt = result["pipelines"].get("null_text")  # None when skipped or failed
    if nt:
        its = nt["null_text_inner_iterations"]
        lines.append(f"null_text: {sum(its)} inner iterations over {len(its)} steps (≤ {meta['inner_iterations']} "
                     "each, early stop as in the reference)")
    for cap, its in sorted((result["pipelines"].get("null_text_caps") or {}).items(), key=lambda kv: int(kv[0])):
        lines.append(f"null_text ≤ {cap} it/step: {sum(its)} inner iterations over {len(its)} steps")
    for name, sd in (result.get("cuda_sync_debug") or {}).items():
        top = ", ".join(f"{site.rsplit('/', 1)[-1]} ×{n}" for site, n in list(sd["sites"].items())[:4])
        lines.append(f"CUDA syncs in {name}: {sd['syncs']} ({sd['per_step']:.1f}/step){': ' + top if top else ''}")
    lines.append("ideal = UNet rows of the stage / rows of the unit, a row with autograd counted 3×; "
                 "ratio − ideal is overhead.")
    if result.get("clips"):
        import bench_clips

        lines += ["", bench_clips.format_report(result["clips"])]
    return "\n".join(lines)


def default_json_path(args) -> Path:
    return REPO_ROOT / "bench" / "results" / f"{args.family}-{args.size}-{args.device}.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=FAMILIES, default="tiny",
                   help="tiny / tiny-sdxl: small SD-topology models (seconds); sd15, sd21-v, sdxl: full architecture, "
                        "random weights (devtools/checkpoints.py cache)")
    p.add_argument("--size", type=int, default=64, help="image size in pixels (square; multiple of 8)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps N (default 50, the reference's)")
    p.add_argument("--inner-iterations", type=int, default=10, help="null_text inner iterations (reference: 10)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="sets PHOTOSWAP_DEVICE before ComfyUI is imported")
    p.add_argument("--dtype", choices=("auto", "fp16", "bf16", "fp32"), default="auto",
                   help="UNet weight dtype for checkpoint families (auto = ComfyUI's choice: fp32 on CPU, fp16 on "
                        "most GPUs)")
    p.add_argument("--windows", default="0.8,0.0,0.6",
                   help="self_output,self_map,cross_map fractions (notebook defaults 0.8,0.0,0.6)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--weights", choices=("inference", "normal"), default="inference",
                   help="load the model inside torch.inference_mode (as ComfyUI's executor does: weights are "
                        "inference tensors; default) or outside it")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the whole suite R times in the process and keep each stage's fastest run (all times "
                        "are kept in the JSON as 'samples'); for noisy, shared machines")
    p.add_argument("--skip-null-text", action="store_true", help="leave out the null_text inversion and e2e rows")
    p.add_argument("--null-text-caps", type=lambda text: [int(v) for v in text.split(",") if v], default=[],
                   metavar="K,K,...", help="also time the null_text inversion alone at these inner-iteration caps "
                                           "(rows inversion_null_text_capK): its cost per iteration, same unit")
    p.add_argument("--profile", metavar="DIR", help="also cProfile plain, swap_trace and swap_lockstep into DIR "
                                                    "(separate runs, not the timed ones)")
    p.add_argument("--sync-debug", action="store_true",
                   help="CUDA: count host-device synchronisations per stage and source line "
                        "(torch.cuda.set_sync_debug_mode, separate untimed runs)")
    p.add_argument("--clip-frames", type=int, default=0, metavar="F",
                   help="also bench_clips.py's report (temporal consistency, per-frame cost vs one image) on an "
                        "F-frame clip, same models and process (0: off)")
    p.add_argument("--json", type=Path, help="output JSON (default bench/results/<family>-<size>-<device>.json)")
    args = p.parse_args(argv)
    if args.size % 8:
        p.error("--size must be a multiple of 8")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run_suite(args)
    print(format_table(result), flush=True)
    path = args.json or default_json_path(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {path}")
    if result["errors"]:
        print(f"FAILED stages: {', '.join(result['errors'])}", file=sys.stderr)
    return result


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)
