"""What one training step of the toy model costs on this machine, per stage, batch size and precision.

Why: the base model must train from scratch within 60 minutes, and which batch sizes and how many steps fit depends
on the machine by a factor of ~3 (docs/quality.md). Choosing them needs measured step costs, taken with the training
script's own step functions (toyworld/train_base.py: vae_step, unet_step) on freshly initialised models.

    .venv/bin/python -m toyworld.step_cost --json docs/toyworld_runs/step_cost-<machine>.json

Run it alone (nothing else on the CPU): it times wall seconds, median of `--steps` steps after `--warmup` steps.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from . import model_io as M
from . import train_base as T


def _median_seconds(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def vae_cost(batch: int, precision: str, warmup: int, steps: int) -> float:
    vae, _text, _unet = M.new_models(0)
    opt = torch.optim.AdamW(vae.parameters(), 1e-4)
    rng = np.random.default_rng(0)
    x, wmap = T.vae_batch(rng, batch)
    return _median_seconds(lambda: T.vae_step(vae, opt, x, wmap, precision), warmup, steps)


def unet_cost(batch: int, precision: str, warmup: int, steps: int) -> float:
    _vae, text, unet = M.new_models(0)
    sched = M.training_scheduler()
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, 1e-4)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, 4, 8, 8, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    ids = M.tokenize(["a photo of a red circle on a gray striped background"] * batch)
    return _median_seconds(lambda: T.unet_step(unet, text, opt, params, sched, x0, t, noise, ids, precision),
                           warmup, steps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vae-batches", type=int, nargs="*", default=[6, 12, 24])
    ap.add_argument("--unet-batches", type=int, nargs="*", default=[32, 64, 128, 256])
    ap.add_argument("--precisions", nargs="*", default=["fp32", "bf16"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for stage, batches, cost in (("vae", args.vae_batches, vae_cost), ("unet", args.unet_batches, unet_cost)):
        for precision in args.precisions:
            for batch in batches:
                sec = cost(batch, precision, args.warmup, args.steps)
                rows.append({"stage": stage, "precision": precision, "batch": batch, "seconds_per_step": round(sec, 4),
                             "ms_per_sample": round(1000 * sec / batch, 2)})
                print(f"{stage:4s} {precision} batch {batch:4d}: {sec:.3f} s/step, {1000 * sec / batch:.1f} ms/sample",
                      flush=True)
    out = {"machine": T.machine(), "threads": args.threads, "warmup": args.warmup, "steps": args.steps, "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
