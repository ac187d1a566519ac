#!/usr/bin/env python
"""How much does moving one swap window edge by one step change the official reference's result? (10 steps, 512 px)

Justifies the tolerance of tests/test_swap_reference.py: if a one-step change of any window moves the swapped latent
by far more than the tolerance, the test pins every window edge. Runs devtools/official_reference.py only (diffusers'
UNet on ../shared/parity/tiny_sd, the shared synthetic start latent and prompt pair).

    .venv/bin/python devtools/reference_sensitivity.py [--threads N]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))  # append, never prepend: the pack's nodes/ must not shadow ComfyUI's nodes.py
from devtools.official_reference import SwapSettings, official_swap  # noqa: E402

DEFAULT_PARITY = REPO_ROOT.parent / "shared" / "parity"
STEPS = 10


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parity", type=Path, default=DEFAULT_PARITY)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    p = args.parity
    unet = UNet2DConditionModel.from_pretrained(p / "tiny_sd" / "unet").eval()
    words = json.loads((p / "manifest.json").read_text())["localblend_word_inds"]
    text = load_file(p / "text.safetensors")
    x_t = load_file(p / "swap_synthetic_c0.6_so0.8_sm0.0.safetensors")["x_t"]
    nulls = text["null_embedding"].unsqueeze(0).expand(STEPS, 1, 77, 32)

    def swapped(out, smap, cross, blend=True):
        return official_swap(unet, x_t, text["text_embeddings"][0:1], text["text_embeddings"][1:2], nulls,
                             text["mapper"][0], text["alphas"][0], (words["source"], words["target"]),
                             SwapSettings(STEPS, out, smap, cross, local_blend=blend))[1]

    print(f"{STEPS} steps, 512 px; relative L2 change of the swapped latent")
    for base, variants in [((0.8, 0.0, 0.6), [(0.7, 0.0, 0.6), (0.8, 0.0, 0.5)]),
                           ((0.3, 0.4, 0.5), [(0.3, 0.3, 0.5), (0.3, 0.4, 0.4)])]:
        reference = swapped(*base)
        for variant in variants:
            change = swapped(*variant) - reference
            print(f"  windows (out, map, cross) {base} -> {variant}: {float(change.norm() / reference.norm()):.2e}")
    reference = swapped(0.8, 0.0, 0.6)
    change = float((swapped(0.8, 0.0, 0.6, blend=False) - reference).norm() / reference.norm())
    print(f"  LocalBlend on -> off at (0.8, 0.0, 0.6): {change:.2e} (the mask is all-true on this random model)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
