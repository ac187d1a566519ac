"""DDIM generation with the toy model's diffusers components, for training-time evaluation and prior images.

Why not ComfyUI here: training runs outside ComfyUI (plain diffusers/transformers modules, gradients), and the
curves and the DreamBooth class images only need the model's own samples. Every number the benchmark reports is
measured through ComfyUI and the pack's nodes instead (bench/quality.py).
"""
from __future__ import annotations

import numpy as np
import torch

from . import model_io as M
from . import scene as W


@torch.no_grad()
def encode_text(text, ids: torch.Tensor) -> torch.Tensor:
    return text(ids)[0]


@torch.no_grad()
def generate(unet, text, vae, prompts, steps: int = 20, cfg: float = 7.5, seed: int = 0, batch: int = 16,
             latents: torch.Tensor | None = None) -> np.ndarray:
    """uint8 N x H x W x 3 images for `prompts` (DDIM, the SD1 schedule of the shipped workflows)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(M.SCHEDULER_CONFIG)
    gen = torch.Generator().manual_seed(seed)
    n = len(prompts)
    if latents is None:
        latents = torch.randn((n, 4, W.SIZE // 8, W.SIZE // 8), generator=gen)
    null = encode_text(text, M.tokenize([""]))
    out = []
    for i in range(0, n, batch):
        cond = encode_text(text, M.tokenize(prompts[i:i + batch]))
        x = latents[i:i + batch].clone()
        ctx = torch.cat([null.expand(len(x), -1, -1), cond])
        sched.set_timesteps(steps)
        for t in sched.timesteps:
            eps = unet(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample
            e_u, e_c = eps.chunk(2)
            x = sched.step(e_u + cfg * (e_c - e_u), t, x).prev_sample
        out.append(decode(vae, x))
    return np.concatenate(out)


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> np.ndarray:
    img = vae.decode(latents / M.SCALE).sample
    return ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def encode(vae, images: np.ndarray, batch: int = 32) -> torch.Tensor:
    """Scaled latents (x SCALE, the mode) of uint8 images, like ComfyUI's VAE Encode + the SD1 latent format."""
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i:i + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1
        out.append(vae.encode(x).latent_dist.mode() * M.SCALE)
    return torch.cat(out)


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB of uint8 images (over `mask` pixels when given)."""
    d = a.astype(np.float64) - b.astype(np.float64)
    if mask is not None:
        d = d[mask]
    mse = float(np.mean(d * d))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
