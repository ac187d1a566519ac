"""Probe a trained toy-world base: does the prompt or the initial noise choose what it draws?

Why: the ε-trained base (commit 51c4c7c) drew the captioned background in about a third of prompts. This script
holds the measurements that found the cause (docs/quality.md, "ε or v?"), so they can be rerun on any folder:

    .venv/bin/python -m toyworld.probe_base [--folder DIR] [--finetune-v 200]

1. generation agreement (shape, colour, background) for 48 held-out and 48 training prompts, cfg 7.5, 20 DDIM steps;
2. one prompt over 16 seeds: which background each draws;
3. the x0 estimate's mean squared error on noised training latents at several t, with the right caption, a wrong
   background word, a wrong object colour and no caption (how much the caption helps the estimate);
4. with --finetune-v N: N steps of `train_base`'s v objective on the folder's weights (lr 3e-4, EMA 0.99), then 1.
   again (whether the objective, not the weights, limits the background).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import detector as D
from . import model_io as M
from . import sampling as S
from . import scene as W
from . import train_base as T
from .metrics import generation_correct, summarise


def agreement(unet, text, vae, scenes_, latents) -> dict:
    imgs = S.generate(unet, text, vae, [s.caption for s in scenes_], 20, 7.5, 0, latents=latents)
    rows = [generation_correct(i, s) for i, s in zip(imgs, scenes_)]
    return {k: round(v, 3) for k, v in summarise(rows).items()}


def prompt_sets(cfg: T.Config) -> dict:
    rng = np.random.default_rng(5)
    train = [W.sample_scene(rng, "train", n_objects=1) for _ in range(48)]
    return {"held_out": T.heldout_prompts(cfg, 48),
            "training": [replace(s, caption=W.caption_of(s, False, True)) for s in train]}


@torch.no_grad()
def x0_errors(unet, text, vae, prediction: str) -> list[dict]:
    acp = M.training_scheduler().alphas_cumprod
    rng = np.random.default_rng(7)
    sc = [W.sample_scene(rng, "train", n_objects=1) for _ in range(64)]
    x0 = S.encode(vae, W.render_batch(sc))
    bgs, cols = list(W.BG_COLOURS), list(W.OBJECT_COLOURS)

    def cap(s, bg=None, col=None):
        obj = replace(s.objects[0], colour=col or s.objects[0].colour)
        return W.caption_of(replace(s, bg=bg or s.bg, objects=(obj,)), False, True)

    captions = {"right": [cap(s) for s in sc],
                "wrong_background": [cap(s, bg=bgs[(bgs.index(s.bg) + 1) % len(bgs)]) for s in sc],
                "wrong_colour": [cap(s, col=cols[(cols.index(s.objects[0].colour) + 1) % len(cols)]) for s in sc],
                "none": [""] * len(sc)}
    gen, out = torch.Generator().manual_seed(0), []
    for t in (999, 900, 700, 500, 200):
        tt = torch.full((len(sc),), t)
        noise = torch.randn(x0.shape, generator=gen)
        a = acp[t]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        row = {"t": t}
        for name, caps in captions.items():
            pred = unet(xt, tt, encoder_hidden_states=S.encode_text(text, M.tokenize(caps))).sample
            x0h = a.sqrt() * xt - (1 - a).sqrt() * pred if prediction == "v_prediction" else \
                (xt - (1 - a).sqrt() * pred) / a.sqrt()
            row[name] = round(((x0h - x0) ** 2).mean().item(), 3)
        out.append(row)
    return out


class FineTune:
    """A short fine-tune of a trained base (text encoder and UNet): AdamW, EMA 0.99 copies, seeded batches of
    train_base's training set; `finish` loads the EMA weights. Shared by the trials that start from a folder."""

    def __init__(self, unet, text, train, cfg: T.Config, lr: float, seed: int):
        self.unet, self.text, self.train_set, self.cfg = unet, text, train, cfg
        self.params = list(unet.parameters()) + list(text.parameters())
        self.opt = torch.optim.AdamW(self.params, lr, betas=(0.9, 0.99), weight_decay=0.0)
        self.ema_u = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        self.ema_t = {k: v.detach().clone() for k, v in text.state_dict().items()}
        self.rng, self.gen, self.cache = np.random.default_rng(seed), torch.Generator().manual_seed(seed), {}
        unet.train(), text.train()

    def batch(self):
        """(indices into the training latents, token ids with caption dropout, timesteps, noise)."""
        idx = self.rng.integers(0, len(self.train_set), self.cfg.unet_batch)
        caps = [W.with_caption(self.train_set[i], self.rng).caption if self.rng.random() > self.cfg.drop_caption
                else "" for i in idx]
        t = torch.randint(0, 1000, (len(idx),), generator=self.gen)
        noise = torch.randn((len(idx), 4, W.SIZE // 8, W.SIZE // 8), generator=self.gen)
        return torch.from_numpy(idx), M.tokenize(caps, self.cache), t, noise

    def after_step(self) -> None:
        T.ema_update(self.ema_u, self.unet, 0.99)
        T.ema_update(self.ema_t, self.text, 0.99)

    def finish(self) -> None:
        self.unet.load_state_dict(self.ema_u)
        self.text.load_state_dict(self.ema_t)
        self.unet.eval(), self.text.eval()


def finetune_v(unet, text, vae, cfg: T.Config, steps: int) -> None:
    """`steps` of train_base's v objective on these weights, then the EMA weights loaded (in place)."""
    sched = M.training_scheduler()
    latents, train = T.encode_training_set(vae, cfg)
    ft = FineTune(unet, text, train, cfg, 3e-4, 99)
    for step in range(1, steps + 1):
        idx, ids, t, noise = ft.batch()
        loss = T.unet_step(unet, text, ft.opt, ft.params, sched, latents[idx], t, noise, ids, "fp32")
        ft.after_step()
        if step % 50 == 0:
            print(f"[finetune-v] step {step}/{steps} loss {loss:.4f}", flush=True)
    ft.finish()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folder", type=Path, default=M.WEIGHTS / M.BASE_NAME)
    ap.add_argument("--finetune-v", type=int, default=0, metavar="STEPS")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    prediction = M.folder_prediction(args.folder)
    vae, text, unet = M.load_diffusers_folder(args.folder)
    vae.requires_grad_(False)
    M.use_prediction(prediction)  # the folder's own objective for sampling
    cfg = T.Config()
    sets = prompt_sets(cfg)
    latents = torch.randn((48, 4, W.SIZE // 8, W.SIZE // 8), generator=torch.Generator().manual_seed(11))
    report = {"folder": str(args.folder), "prediction_type": prediction,
              "agreement": {k: agreement(unet, text, vae, v, latents) for k, v in sets.items()}}
    one = sets["training"][0].caption
    report["one_prompt_16_seeds"] = {"prompt": one, "backgrounds": [
        D.detect(i, 1).bg for i in S.generate(unet, text, vae, [one] * 16, 20, 7.5, 3)]}
    report["x0_mse"] = x0_errors(unet, text, vae, prediction)
    if args.finetune_v:
        M.use_prediction("v_prediction")
        finetune_v(unet, text, vae, cfg, args.finetune_v)
        report[f"after_{args.finetune_v}_v_steps"] = {k: agreement(unet, text, vae, v, latents)
                                                      for k, v in sets.items()}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
