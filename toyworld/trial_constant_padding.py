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

import numpy as np
import torch

from . import model_io as M
from . import scene as W
from . import train_base as T


def finetune(steps: int, mode: str, out: Path) -> None:
    """`steps` of fine-tuning of the committed base; mode "pad": the padding rows are the empty caption's."""
    folder = M.WEIGHTS / M.BASE_NAME
    vae, text, unet = M.load_diffusers_folder(folder)
    vae.requires_grad_(False)
    M.use_prediction(M.folder_prediction(folder))
    cfg, sched = T.Config(), M.training_scheduler()
    latents, train = T.encode_training_set(vae, cfg)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, 2e-4, betas=(0.9, 0.99), weight_decay=0.0)
    ema_u = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    ema_t = {k: v.detach().clone() for k, v in text.state_dict().items()}
    rng, gen, cache = np.random.default_rng(7), torch.Generator().manual_seed(7), {}
    empty_ids = M.tokenize([""], cache)
    unet.train(), text.train()
    t0 = time.time()
    for step in range(1, steps + 1):
        idx = rng.integers(0, len(train), cfg.unet_batch)
        caps = [W.with_caption(train[i], rng).caption if rng.random() > cfg.drop_caption else "" for i in idx]
        ids = M.tokenize(caps, cache)
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        noise = torch.randn((len(idx), 4, W.SIZE // 8, W.SIZE // 8), generator=gen)
        x0 = latents[torch.from_numpy(idx)]
        ctx = text(ids)[0]
        if mode == "pad":
            first_eos = (ids == M.EOS).int().argmax(dim=1)
            keep = (torch.arange(ids.shape[1])[None] <= first_eos[:, None])[..., None]
            ctx = torch.where(keep, ctx, text(empty_ids)[0].expand_as(ctx))
        pred = unet(sched.add_noise(x0, noise, t), t, encoder_hidden_states=ctx).sample
        target = M.training_target(x0, noise, sched.alphas_cumprod[t])
        loss = (T.snr_weights(sched.alphas_cumprod, t) * ((pred.float() - target) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        T.ema_update(ema_u, unet, 0.99)
        T.ema_update(ema_t, text, 0.99)
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    unet.load_state_dict(ema_u)
    text.load_state_dict(ema_t)
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
