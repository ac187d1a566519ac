#!/usr/bin/env python
"""Flux (#17): the swap's stages as ratios to plain Flux sampling, side by side in one process.

    .venv/bin/python bench/bench_flux.py                                  # tiny Flux (ComfyUI's classes), seconds
    .venv/bin/python bench/bench_flux.py --family flux-d1s1 --size 256    # full-width Flux, 1 double + 1 single block
    .venv/bin/python bench/bench_flux.py --family flux-d19s38 --size 1024 --device cuda   # Flux-dev's depth, a GPU

Stages (under `torch.inference_mode()`, as ComfyUI's executor runs nodes):
- `plain` (the unit): ComfyUI's stock Flux path, `comfy.sample.sample_custom` with KSAMPLER "euler" over
  BasicScheduler "simple" sigmas, cfg 1 and the guidance in the conditioning (what SamplerCustom(Advanced) +
  FluxGuidance run);
- `inversion_direct`: `run_inversion` (the flow ODE, Euler, source pinned; it records the source pass's steps
  1 … N−1 on its way, its calls being theirs); `inversion_midpoint`: the same with the second-order midpoint step
  (two calls per step), with `round_trip_error` = max |Δ| of the unpinned trip back (the same solver, z_T to σ = 0)
  against the image latent, for both solvers;
- `record`: the Attention Recorder over that inversion (recording every step): it completes the inversion's
  recording with step 0, one call;
- `swap_trace`: the target pass with the recorded trace; `swap_lockstep`: in lockstep (source and target rows in one
  call, no stored attention: what runs when a trace does not fit the budget);
- `e2e` = inversion + record + swap_trace and `e2e_lockstep` = inversion + lockstep record (fraction 0) + lockstep
  swap, each one timer.
Model calls and batch rows are counted with a forward pre-hook on the diffusion model, so a ratio's `ideal` (rows of
work relative to the plain pass) is told apart from overhead. Targets (issue #17): inversion ≤ 1.1×, swap with a
recorded trace ≤ 1.15×, end to end ≤ 2.5×. By work e2e is (N + 1 + N)/N rows (the inversion records the source
pass), e2e_lockstep 1 + 2 rows per call.
Random weights: the numbers measure cost, never quality.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
for _path in (REPO_ROOT, BENCH_DIR):  # append: the pack's nodes/ must not shadow ComfyUI's nodes.py
    if str(_path) not in sys.path:
        sys.path.append(str(_path))

import bench_inversion as bi  # noqa: E402

SOURCE, SUBJECT, CONCEPT = "a photo of a cat sitting on a sofa", "cat", "sks dog"
GUIDANCE = 3.5
TARGETS = {"inversion_direct": 1.1, "swap_trace": 1.15, "e2e": 2.5, "e2e_lockstep": 2.5}
FAMILY = re.compile(r"tiny-flux|flux-d(\d+)s(\d+)")


def load_flux(family: str):
    """(model, clip, vae): the tiny Flux, or random full-width Flux files of depth d/s through ComfyUI's loaders
    (UNETLoader's and DualCLIPLoader's functions; devtools/flux_checkpoints.py builds the files once)."""
    match = FAMILY.fullmatch(family)
    if match is None:
        raise SystemExit(f"--family must be tiny-flux or flux-d<double>s<single> (got {family!r})")
    if family == "tiny-flux":
        from devtools.tiny_flux import build_tiny_flux

        tf = build_tiny_flux(seed=0)
        return tf.model, tf.clip, tf.vae
    import comfy.sd
    import comfy.utils

    from devtools import flux_checkpoints as fc

    depth, single = int(match.group(1)), int(match.group(2))
    files = fc.ensure_flux_files(depth=depth, single=single, components=("unet", "clip_l", "t5xxl", "vae"))
    model = comfy.sd.load_diffusion_model(str(files["unet"]))
    clip = fc.load_flux_clip(files["clip_l"], files["t5xxl"])
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(files["vae"])))
    return model, clip, vae


def photo_latent(vae, size: int):
    """bench_inversion's synthetic photo (gradients + a disc), VAE-encoded."""
    import torch

    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    disc = (((xs - 0.5) ** 2 + (ys - 0.55) ** 2) < 0.08).float()
    return vae.encode(torch.stack([xs, ys, 0.5 * (1 - disc) + disc * 0.9], dim=-1).unsqueeze(0))


class Stages:
    def __init__(self, model, clip, latent, steps: int):
        from devtools.tiny_flux import encode_flux

        from comfyui_photoswap.photoswap_core.prompts import encode_prompt_pair
        from comfyui_photoswap.photoswap_core.swap_rules import SwapWindows

        self.model, self.latent, self.steps = model, latent, steps
        self.src, self.tgt, self.neg, self.prompts = encode_prompt_pair(clip, SOURCE, SUBJECT, CONCEPT)
        self.plain_positive = encode_flux(clip, self.prompts.target_prompt, GUIDANCE)
        self.windows = SwapWindows(self_output=0.8, self_map=0.0, cross_map=0.6, local_blend=True)

    def plain(self, steps=None):
        import torch

        from devtools.tiny_flux import sample_flux

        return sample_flux(self.model, self.plain_positive, torch.zeros_like(self.latent), steps or self.steps)

    def invert(self, steps=None, solver="euler"):
        from comfyui_photoswap.photoswap_core.inversion import InversionSettings, run_inversion

        return run_inversion(self.model, self.latent, self.src, self.neg,
                             InversionSettings(method="direct", steps=steps or self.steps, cfg=1.0, solver=solver))

    def round_trip_error(self, inversion, solver) -> float:
        """max |Δ| between the image latent (model space) and the flow ODE run back from z_T with `solver`, unpinned."""
        from comfyui_photoswap.photoswap_core.evaluator import DirectEvaluator

        ev = DirectEvaluator(self.model, inversion.z_t.shape)
        kw = ev.model_kwargs(ev.arch.prompt_entry(self.model, self.src, "source_positive"))
        x = inversion.z_t.to(ev.device)

        def v(x_at, s):
            return ev.eps(x_at, s, kw["c_crossattn"], kw.get("y"), guidance=kw["guidance"])

        sig = inversion.schedule.sigmas.tolist()
        for a, b in zip(sig[:-1], sig[1:]):
            m = 0.5 * (a + b)
            x = x + (b - a) * (v(x, a) if solver == "euler" else v(x + (m - a) * v(x, a), m))
        return float((x.cpu() - inversion.trajectory[-1]).abs().max())

    def record(self, inversion, fraction=1.0):
        from comfyui_photoswap.photoswap_core.recorder import record_source

        return record_source(self.model, self.src, self.neg, inversion=inversion, cfg=1.0, fraction=fraction)[0]

    def swap(self, trace, lockstep):
        from comfyui_photoswap.photoswap_core.swap_sampler import swap

        result = swap(self.model, trace, self.tgt, self.neg, self.prompts, self.windows, 1.0, lockstep=lockstep)
        expected = "lockstep" if lockstep or not trace.has_attention else "target"
        if result.mode != expected:
            raise RuntimeError(f"the swap ran in mode {result.mode!r}, expected {expected!r}")
        return result.target

    def e2e(self):
        return self.swap(self.record(self.invert()), lockstep=False)

    def e2e_lockstep(self):
        return self.swap(self.record(self.invert(), fraction=0.0), lockstep=True)


def run(family="tiny-flux", size=64, steps=10, device="cpu", repeat=1) -> dict:
    import torch

    from devtools.comfy_env import bootstrap

    bootstrap(cpu=device == "cpu")
    import comfy.model_management as mm
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    with torch.inference_mode():
        model, clip, vae = load_flux(family)
        mm.load_models_gpu([model])
        latent = photo_latent(vae, size)
        del vae
        st = Stages(model, clip, latent, steps)
        counter = bi.UNetCounter(model.model.diffusion_model)
        inv = st.invert(2)  # warm-up: every code path once at 2 steps
        st.plain(2), st.swap(st.record(inv), False), st.swap(st.record(inv, 0.0), True)
        inv = st.invert()
        trace, lock_trace = st.record(inv), st.record(inv, 0.0)
        calls = {"plain": st.plain, "inversion_direct": st.invert,
                 "inversion_midpoint": lambda: st.invert(solver="midpoint"), "record": lambda: st.record(inv),
                 "swap_trace": lambda: st.swap(trace, False), "swap_lockstep": lambda: st.swap(lock_trace, True),
                 "e2e": st.e2e, "e2e_lockstep": st.e2e_lockstep}
        stages = {}
        for name, fn in calls.items():
            best = None
            for _ in range(repeat):
                counter.reset()
                seconds, _ = bi.timed(fn, device)
                if best is None or seconds < best["seconds"]:
                    best = {"seconds": seconds} | counter.snapshot()
            stages[name] = best
        counter.close()
        for name, solver in (("inversion_direct", "euler"), ("inversion_midpoint", "midpoint")):
            stages[name]["round_trip_error"] = st.round_trip_error(st.invert(solver=solver), solver)
    unit = stages["plain"]
    for name, stage in stages.items():
        stage["ratio"] = stage["seconds"] / unit["seconds"]
        stage["ideal_ratio"] = stage["unet_rows"] / unit["unet_rows"]
        if name in TARGETS:
            stage["target"] = TARGETS[name]
    return {"family": family, "model": type(model.model.model_config).__name__, "size": size, "steps": steps,
            "repeat": repeat, "statistic": "fastest of the repetitions" if repeat > 1 else "single run",
            "unit": "comfy.sample.sample_custom, euler, BasicScheduler 'simple', cfg 1, guidance 3.5",
            "machine": bi.machine_info(device), "stages": stages}


def format_report(report: dict) -> str:
    lines = [f"Flux stages: {report['family']} ({report['model']}), {report['size']} px, {report['steps']} steps, "
             f"{report['machine'].get('cpu') if report['machine']['device'] == 'cpu' else report['machine'].get('gpu')}",
             f"{'stage':<20}{'seconds':>9}{'ratio':>8}{'ideal':>8}{'target':>8}{'calls':>7}{'rows':>6}"
             f"{'round trip':>12}"]
    for name, s in report["stages"].items():
        target = f"≤{s['target']:g}" if "target" in s else ""
        trip = f"{s['round_trip_error']:>12.2e}" if "round_trip_error" in s else ""
        lines.append(f"{name:<20}{s['seconds']:>9.3f}{s['ratio']:>8.2f}{s['ideal_ratio']:>8.2f}{target:>8}"
                     f"{s['unet_calls']:>7}{s['unet_rows']:>6}{trip}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="tiny-flux", help="tiny-flux, or flux-d<double>s<single>")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    report = run(args.family, args.size, args.steps, args.device, args.repeat)
    print(format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
