#!/usr/bin/env python
"""How closely can ANY implementation reproduce the shared end-to-end parity latents? (docs/swap.md, Parity status)

Runs diffusers' own UNet2DConditionModel on the shared tiny model (`../shared/parity/tiny_sd`) in a plain DDIM
CFG-7.5 loop from the official x_T with the official per-step null embeddings — exactly what the official code does
for the source row of `swap_real_*` (the attention controller and LocalBlend never change the source row) — and
compares with the official source latent. Then it perturbs x_T by 1e-7 to show the model's sensitivity. With
`--official-threads 1,2` it also runs the whole official swap the way the official code computes it
(devtools/official_reference.py: four-row batch, explicit maps, in-place edits, LocalBlend) with each thread count,
and compares both rows with the official latents and the thread counts with each other (~7 min per run).

    .venv/bin/python devtools/parity_floor.py [--threads N] [--official-threads 1,2] [--parity DIR]

No ComfyUI and no code of this pack is involved: the numbers bound what the parity test can expect.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))  # append, never prepend: the pack's nodes/ must not shadow ComfyUI's nodes.py
DEFAULT_PARITY = REPO_ROOT.parent / "shared" / "parity"


def ddim_cfg_loop(unet, x, timesteps, uncond_per_step, cond, final_alpha, cfg=7.5, step=20):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            eps = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond_per_step[i], cond])).sample
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + cfg * (eps_c - eps_u)
            a_t = alphas[t]
            a_prev = alphas[t - step] if t - step >= 0 else torch.tensor(final_alpha)
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def rel_l2(a, b) -> float:
    return float((a - b).norm() / b.norm())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parity", type=Path, default=DEFAULT_PARITY)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--official-threads", default="",
                        help="comma-separated thread counts for full official-arithmetic swap runs (e.g. 1,2)")
    args = parser.parse_args(argv)
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    p = args.parity
    unet = UNet2DConditionModel.from_pretrained(p / "tiny_sd" / "unet").eval()
    manifest = json.loads((p / "manifest.json").read_text())
    sched = manifest["scheduler"]
    text, inv = load_file(p / "text.safetensors"), load_file(p / "inversion.safetensors")
    swap = load_file(p / "swap_real_c0.6_so0.8_sm0.0.safetensors")
    cond, x_t = text["text_embeddings"][0:1], inv["x_T"]
    official = swap["latents_final"][0:1]
    loop = lambda x: ddim_cfg_loop(unet, x, sched["timesteps"], inv["uncond_embeddings"], cond,  # noqa: E731
                                   sched["final_alpha_cumprod"])
    ours = loop(x_t.clone())
    perturbed = loop(x_t + 1e-7 * torch.randn(x_t.shape, generator=torch.Generator().manual_seed(0)))
    import diffusers

    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, diffusers "
          f"{diffusers.__version__}, {args.threads} thread(s); the official run: diffusers 0.14, float32, CPU")
    print(f"diffusers UNet, plain DDIM CFG 7.5 from the official x_T and null embeddings vs the official source "
          f"latent: rel L2 {rel_l2(ours, official):.3e}, max abs {float((ours - official).abs().max()):.3e}")
    print(f"the same loop from x_T + 1e-7·N(0,1) vs from x_T: rel L2 {rel_l2(perturbed, ours):.3e}")
    if args.official_threads:
        official_arithmetic(unet, manifest, text, inv, swap, [int(n) for n in args.official_threads.split(",")])
    return 0


def official_arithmetic(unet, manifest, text, inv, swap, thread_counts):
    """The whole official real-image swap computed as the official code computes it, once per thread count."""
    from devtools.official_reference import SwapSettings, official_swap

    setting = manifest["runs"]["swap_real_c0.6_so0.8_sm0.0"]["setting"]
    settings = SwapSettings(manifest["num_ddim_steps"], setting["self_output_replace_steps"],
                            setting["self_map_replace_steps"], setting["cross_map_replace_steps"])
    words = manifest["localblend_word_inds"]
    official, runs = swap["latents_final"], {}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        runs[threads] = official_swap(unet, inv["x_T"], text["text_embeddings"][0:1], text["text_embeddings"][1:2],
                                      inv["uncond_embeddings"], text["mapper"][0], text["alphas"][0],
                                      (words["source"], words["target"]), settings)
        print(f"official arithmetic (4-row batch, explicit maps), {threads} thread(s), vs the official latents: "
              f"source rel L2 {rel_l2(runs[threads][0], official[0]):.3e}, "
              f"swapped rel L2 {rel_l2(runs[threads][1], official[1]):.3e}")
    if len(runs) > 1:
        (a, x), (b, y) = list(runs.items())[:2]
        print(f"official arithmetic, {a} vs {b} thread(s): source rel L2 {rel_l2(x[0], y[0]):.3e}, "
              f"swapped rel L2 {rel_l2(x[1], y[1]):.3e}")


if __name__ == "__main__":
    raise SystemExit(main())
