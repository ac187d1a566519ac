"""Trial: does the toy UNet read the caption from the padding tokens, or use them as an attention sink?

Fine-tunes the committed base (its own objective, lr 2e-4, EMA 0.99, the training set of train_base) with the
EOS/padding rows after the first EOS replaced by the empty caption's (caption-independent), then saves the base
folder under OUT for `python -m toyworld.probe_attention --form base` (TOYWORLD_WEIGHTS=OUT, with the other files of
toyworld/weights copied beside it). Mode `ctrl` fine-tunes the same way with the padding unchanged.

    cp -r toyworld/weights OUT && python -m toyworld.trial_constant_padding 400 pad OUT

Result (docs/quality.md, "LocalBlend in the toy world"): the attention shares and the word maps did not move.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from . import model_io as M
from . import train_base as T
from .probe_base import FineTune


def finetune(steps: int, mode: str, out: Path) -> None:
    """`steps` of fine-tuning of the committed base; mode "pad": the padding rows are the empty caption's."""
    folder = M.WEIGHTS / M.BASE_NAME
    vae, text, unet = M.load_diffusers_folder(folder)
    vae.requires_grad_(False)
    M.use_prediction(M.folder_prediction(folder))
    cfg, sched = T.Config(), M.training_scheduler()
    latents, train = T.encode_training_set(vae, cfg)
    ft = FineTune(unet, text, train, cfg, 2e-4, 7)
    empty_ids = M.tokenize([""], ft.cache)
    t0 = time.time()

    def constant_padding(ids, ctx):
        first_eos = (ids == M.EOS).int().argmax(dim=1)
        keep = (torch.arange(ids.shape[1])[None] <= first_eos[:, None])[..., None]
        return torch.where(keep, ctx, text(empty_ids)[0].expand_as(ctx))

    for step in range(1, steps + 1):
        idx, ids, t, noise = ft.batch()
        loss = T.unet_step(unet, text, ft.opt, ft.params, sched, latents[idx], t, noise, ids, "fp32",
                           edit_context=constant_padding if mode == "pad" else None)
        ft.after_step()
        if step % 50 == 0:
            print(f"step {step} loss {loss:.4f} {time.time() - t0:.0f}s", flush=True)
    ft.finish()
    M.save_diffusers_folder(out / M.BASE_NAME, vae, text, unet)
    print("saved", out / M.BASE_NAME)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[1] not in ("pad", "ctrl"):
        print("usage: python -m toyworld.trial_constant_padding STEPS pad|ctrl OUT", file=sys.stderr)
        return 2
    torch.set_num_threads(2)
    finetune(int(args[0]), args[1], Path(args[2]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
