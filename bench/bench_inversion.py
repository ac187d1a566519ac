#!/usr/bin/env python
"""Inversion benchmark: one plain CFG sampling pass vs each inversion method, same model, size and process.

    .venv/bin/python bench/bench_inversion.py                                  # random full SD1.5, 64 px, 50 steps, CPU
    .venv/bin/python bench/bench_inversion.py --steps 10 --inner-iterations 2  # quick (CI)
    .venv/bin/python bench/bench_inversion.py --family sdxl --size 1024 --device cuda
    .venv/bin/python bench/bench_inversion.py --family tiny --size 64          # tiny SD-topology model, seconds

Measured (all under `torch.inference_mode()`, as ComfyUI's executor runs nodes; checkpoint models are loaded inside
it too, so their weights are inference tensors exactly as in the server and null-text takes the server's path):
- `plain` (the unit): ComfyUI's stock KSampler path, `nodes.common_ksampler` with sampler "ddim", scheduler
  "ddim_uniform", `--steps` steps, CFG 7.5: `--steps` UNet calls on a 2-row (cond + uncond) batch.
- `plain_custom`: `comfy.sample.sample_custom`, KSAMPLER "euler" over our DDIM sigmas (the reference schedule).
- `inversion_<method>`: `run_inversion` for ddim, negative_prompt, direct, null_text (`--inner-iterations`, early stop
  as in the reference — on random weights it never fires, so null_text is its worst case).
Each is warmed up once (2 steps) before timing. UNet calls and batch rows are counted with a forward pre-hook, so the
`ideal` ratio (rows of work relative to the plain pass) can be told apart from overhead. Targets (DESIGN.md §6):
direct ≤ 0.7×, null_text ≤ 6× a plain pass.

The timing helpers (`machine_info`, `UNetCounter`, `timed`, `load_models`, `plain_pass`, `inversion_pass`,
`run_benchmark`) are importable for a larger benchmark suite.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))  # append, never prepend: our nodes/ must not shadow ComfyUI's nodes.py

SOURCE_PROMPT = "a photo of a cat sitting on a sofa"
CFG = 7.5
METHODS = ("ddim", "negative_prompt", "direct", "null_text")
FAMILIES = ("sd15", "sd21-v", "sdxl", "tiny", "tiny-sdxl")
TARGETS = {"inversion_direct": 0.7, "inversion_null_text": 6.0}


# ------------------------------------------------------------------------------------------------------ helpers

def machine_info(device: str) -> dict:
    """Machine, device and software versions, for the record next to the numbers."""
    import torch

    from devtools.comfy_env import comfyui_path

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "device": device}
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    try:
        import psutil

        info["ram_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    try:
        text = (comfyui_path() / "comfyui_version.py").read_text()
        info["comfyui"] = text.split("__version__", 1)[1].split('"')[1]
    except (OSError, IndexError):
        info["comfyui"] = "unknown"
    try:
        pack = sys.modules.get("comfyui_photoswap")
        info["photoswap"] = getattr(pack, "__version__", "unknown")
    except Exception:  # noqa: BLE001
        info["photoswap"] = "unknown"
    return info


class UNetCounter:
    """Counts UNet forward calls and batch rows (and rows with autograd enabled) via a forward pre-hook."""

    def __init__(self, unet):
        self.calls = self.rows = self.grad_rows = 0
        self._handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        import torch

        x = args[0] if args else kwargs.get("x")
        rows = int(x.shape[0]) if x is not None else 0
        self.calls += 1
        self.rows += rows
        if torch.is_grad_enabled():
            self.grad_rows += rows

    def reset(self):
        self.calls = self.rows = self.grad_rows = 0

    def snapshot(self) -> dict:
        return {"unet_calls": self.calls, "unet_rows": self.rows, "unet_rows_with_grad": self.grad_rows}

    def close(self):
        self._handle.remove()


def _sync(device: str):
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, device: str = "cpu"):
    """(seconds, result) of one call, synchronised on CUDA."""
    _sync(device)
    t0 = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - t0, result


@contextmanager
def _quiet_pbar():
    import comfy.utils

    saved = comfy.utils.PROGRESS_BAR_ENABLED
    comfy.utils.PROGRESS_BAR_ENABLED = False
    try:
        yield
    finally:
        comfy.utils.PROGRESS_BAR_ENABLED = saved


def load_models(family: str, size: int):
    """(model, clip, vae, LATENT dict of a synthetic photo-like image at size×size px) for a family."""
    import torch

    if family in ("tiny", "tiny-sdxl"):
        from devtools.tiny_models import build_tiny

        models = build_tiny("sdxl" if family == "tiny-sdxl" else "sd15")
        model, clip, vae = models.model, models.clip, models.vae
    else:
        import comfy.sd

        from devtools import checkpoints

        path = checkpoints.ensure_checkpoint(family)
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)[:3]
    # a smooth synthetic image (gradients + a disc), VAE-encoded like a real photo
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    disc = (((xs - 0.5) ** 2 + (ys - 0.55) ** 2) < 0.08).float()
    image = torch.stack([xs, ys, 0.5 * (1 - disc) + disc * 0.9], dim=-1).unsqueeze(0)
    latent = {"samples": vae.encode(image[..., :3])}
    return model, clip, vae, latent


def encode(clip, text: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def plain_pass(model, positive, negative, latent, steps: int, cfg: float = CFG):
    """The stock KSampler path: nodes.common_ksampler, sampler ddim, scheduler ddim_uniform, denoise 1."""
    import nodes

    with _quiet_pbar():
        return nodes.common_ksampler(model, 0, steps, cfg, "ddim", "ddim_uniform", positive, negative, latent)[0]


def plain_custom_pass(model, positive, negative, latent, steps: int, cfg: float = CFG):
    """comfy.sample.sample_custom with Euler over our DDIM sigmas (add_noise off, from the latent)."""
    import comfy.sample
    import comfy.samplers
    import torch

    from comfyui_photoswap.photoswap_core.arch.ddim import ddim_schedule

    sigmas = ddim_schedule(model.get_model_object("model_sampling"), steps).sigmas
    samples = latent["samples"]
    return comfy.sample.sample_custom(model, torch.zeros_like(samples), cfg, comfy.samplers.sampler_object("euler"),
                                      sigmas, positive, negative, samples, disable_pbar=True)


def inversion_pass(model, positive, negative, latent, method: str, steps: int, inner_iterations: int = 10,
                   cfg: float = CFG):
    from comfyui_photoswap.photoswap_core.inversion import InversionSettings, run_inversion

    settings = InversionSettings(method=method, steps=steps, cfg=cfg, inner_iterations=inner_iterations)
    return run_inversion(model, latent["samples"], positive, negative, settings)


def run_benchmark(family="sd15", size=64, steps=50, inner_iterations=10, device="cpu", methods=METHODS,
                  log=print) -> dict:
    """Load once, warm up, time plain / plain_custom / each inversion method. Returns the JSON-ready report."""
    import torch

    from devtools.comfy_env import bootstrap

    bootstrap(cpu=device == "cpu")
    import comfy.model_management as mm

    report = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(device),
              "settings": {"family": family, "size": size, "latent": [size // 8, size // 8], "steps": steps,
                           "cfg": CFG, "inner_iterations": inner_iterations, "early_stop_epsilon": 1e-5,
                           "methods": list(methods)},
              "stages": {}}
    with torch.inference_mode():
        t_load, (model, clip, vae, latent) = timed(lambda: load_models(family, size), device)
        report["load_seconds"] = round(t_load, 2)
        report["machine"]["model"] = type(model.model.model_config).__name__
        report["machine"]["unet_dtype"] = str(model.model.get_dtype())
        positive, negative = encode(clip, SOURCE_PROMPT), encode(clip, "")
        mm.load_models_gpu([model])
        counter = UNetCounter(model.model.diffusion_model)
        stages = [("plain", lambda n: plain_pass(model, positive, negative, latent, n)),
                  ("plain_custom", lambda n: plain_custom_pass(model, positive, negative, latent, n))]
        for method in methods:
            stages.append((f"inversion_{method}", lambda n, m=method: inversion_pass(
                model, positive, negative, latent, m, n, inner_iterations if n == steps else 1)))
        try:
            log(f"warm-up (2 steps each) on {report['machine']['model']} {size}x{size} px, {device} ...")
            for _, fn in stages:
                fn(2)
            for name, fn in stages:
                counter.reset()
                seconds, out = timed(lambda: fn(steps), device)
                entry = {"seconds": round(seconds, 3), **counter.snapshot()}
                if name.startswith("inversion_"):
                    image_vp = latent["samples"].float() * out.arch.latent.scale
                    entry["reconstruction_mse"] = float((out.trajectory[-1] - image_vp).pow(2).mean())
                    if out.inner_iterations:
                        entry["inner_iterations"] = sum(out.inner_iterations)
                report["stages"][name] = entry
                log(f"  {name:28s} {seconds:9.2f} s  ({counter.calls} UNet calls, {counter.rows} rows)")
        finally:
            counter.close()
    unit = report["stages"]["plain"]
    for name, entry in report["stages"].items():
        entry["ratio"] = round(entry["seconds"] / unit["seconds"], 3)
        entry["ideal_ratio"] = round(entry["unet_rows"] / max(1, unit["unet_rows"]), 3)
        if name in TARGETS:
            entry["target"] = TARGETS[name]
            entry["meets_target"] = entry["ratio"] <= TARGETS[name]
    return report


def format_report(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        f"Photoswap inversion benchmark — {m.get('model')} ({s['family']}), {s['size']}x{s['size']} px, "
        f"{s['steps']} steps, CFG {s['cfg']}, null_text ≤{s['inner_iterations']} inner iterations",
        f"machine: {m.get('cpu')} ({m.get('cpu_count')} cores, {m.get('threads')} torch threads, "
        f"{m.get('ram_gb')} GB RAM){', GPU ' + m['gpu'] if 'gpu' in m else ''}; device {m['device']}; "
        f"torch {m['torch']}; ComfyUI {m.get('comfyui')}; photoswap {m.get('photoswap')}; UNet {m.get('unet_dtype')}",
        f"{'stage':28s} {'seconds':>9s} {'× plain':>8s} {'ideal':>7s} {'target':>7s}  UNet calls/rows",
    ]
    for name, e in report["stages"].items():
        target = f"≤{e['target']:g}" if "target" in e else ""
        flag = "" if "meets_target" not in e else (" ok" if e["meets_target"] else " MISSED")
        lines.append(f"{name:28s} {e['seconds']:9.2f} {e['ratio']:8.2f} {e['ideal_ratio']:7.2f} {target:>7s}"
                     f"  {e['unet_calls']}/{e['unet_rows']}{flag}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd15", choices=FAMILIES,
                        help="random full-architecture checkpoint (sd15, sd21-v, sdxl) or a tiny model")
    parser.add_argument("--size", type=int, default=64, help="image size in pixels (square), default 64")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps, default 50")
    parser.add_argument("--inner-iterations", type=int, default=10, help="null_text inner iterations, default 10")
    parser.add_argument("--device", default=os.environ.get("PHOTOSWAP_DEVICE", "cpu"), choices=("cpu", "cuda"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--json", default=str(REPO_ROOT / "artifacts" / "bench_inversion.json"),
                        help="where to write the JSON report (default artifacts/bench_inversion.json)")
    args = parser.parse_args(argv)
    if args.size % 8:
        parser.error("--size must be a multiple of 8")
    report = run_benchmark(args.family, args.size, args.steps, args.inner_iterations, args.device, args.methods,
                           log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_report(report))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
