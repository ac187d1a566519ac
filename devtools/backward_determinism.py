#!/usr/bin/env python
"""Is the UNet's backward pass (what null-text optimisation runs) bitwise reproducible on this machine?

Loads the cached random SD1.5 checkpoint through ComfyUI's loader (as the server does, inside inference mode), then
computes the gradient of a loss w.r.t. the text context four times with identical inputs, with 1 thread and with the
default thread count, and prints whether the gradients are identical. README "Limitations" and
tests/test_reliability.py::test_server_cancel_during_null_text_optimisation rely on this.

    .venv/bin/python devtools/backward_determinism.py [--size 64]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))  # append: the pack's nodes/ must not shadow ComfyUI's nodes.py


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="image size in px (latent = size/8)")
    args = parser.parse_args(argv)
    from devtools.checkpoints import checkpoint_path
    from devtools.comfy_env import bootstrap

    bootstrap()
    import comfy.model_management as mm
    import comfy.sd

    from comfyui_photoswap.photoswap_core.inversion import _replace_inference_tensors

    with torch.inference_mode():
        model = comfy.sd.load_checkpoint_guess_config(str(checkpoint_path("sd15")), output_vae=False,
                                                      output_clip=False)[0]
        mm.load_models_gpu([model])
    unet = model.model.diffusion_model
    side = args.size // 8
    gen = torch.Generator().manual_seed(0)
    x, ctx0 = torch.randn(1, 4, side, side, generator=gen), torch.randn(1, 77, 768, generator=gen)
    with torch.inference_mode(False), torch.enable_grad():
        _replace_inference_tensors(unet)

        def grad():
            ctx = ctx0.clone().requires_grad_(True)
            (unet(x, torch.tensor([500.0]), context=ctx) ** 2).mean().backward()
            return ctx.grad

        default_threads = torch.get_num_threads()
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            grads = [grad() for _ in range(4)]
            same = [torch.equal(grads[0], g) for g in grads[1:]]
            print(f"{threads} thread(s): gradients of 4 identical backward passes identical to the first: {same}")
        torch.set_num_threads(default_threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
