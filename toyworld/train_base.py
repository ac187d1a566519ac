"""Train the toy world's base model from scratch on the CPU, and save it as a diffusers folder (fp16).

One command (seeded; stages in order, nothing downloaded):

    .venv/bin/python -m toyworld.train_base            # writes toyworld/weights/toyworld_base + training_log.json

1. VAE (4 latent channels, x8 downscale) on random crops of world renders; its latents are then re-parametrised
   exactly (a per-channel affine folded into quant_conv/post_quant_conv) so that latent x 0.18215 -- the SD1 latent
   format ComfyUI applies -- has zero mean and unit variance per channel.
2. The training set's latents (VAE mode, as ComfyUI's VAE Encode), then CLIP text encoder + UNet together,
   epsilon prediction on the SD1 schedule (`--prediction v_prediction` trains v; docs/quality.md compares them),
   captions from the grammar re-drawn every epoch, 10 % empty captions (for classifier-free guidance), min-SNR
   weighting, EMA weights saved.
3. Curves in training_log.json: losses, the VAE's held-out PSNR, and the detector accuracy of generations for
   held-out prompts at a few points (diffusers DDIM; the benchmark re-measures everything through ComfyUI).

Token-embedding rows of words outside the world's vocabulary start at zero and stay zero (no gradient reaches
them): every unknown word, "sks" included, means "nothing" to the base model, and the fp16 file compresses in git.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import model_io as M
from . import sampling as S
from . import scene as W


@dataclass
class Config:
    seed: int = 0
    threads: int = 2
    vae_steps: int = 2000  # an upper bound: vae_ceiling stops it (1100 steps on the Xeon run)
    vae_batch: int = 12
    vae_lr: float = 1e-3
    n_train: int = 5000
    unet_steps: int = 5200
    unet_batch: int = 64
    unet_lr: float = 1e-3
    ema: float = 0.998
    drop_caption: float = 0.1
    eval_prompts: int = 32
    eval_every: int = 500
    eval_steps: int = 20
    eval_cfg: float = 7.5
    decoder_steps: int = 0  # stage 3, the decoder alone with the encoder frozen; off: the ceiling-stopped VAE reads
    decoder_lr: float = 5e-4
    # "fp32" or "bf16" (autocast on the CPU, weights stay fp32): on a CPU with AMX, bf16 makes the VAE's convolutions
    # 1.6x faster but the UNet's small matmuls 2x slower (toyworld/step_cost.py, docs/toyworld_runs/)
    vae_precision: str = "bf16"
    unet_precision: str = "fp32"
    vae_ceiling: float = 0.95  # stop the VAE stage once the detector reads all attributes of this fraction of
    # reconstructions of held-out world renders (0: never); the concept renders' reading is logged beside it
    vae_eval_every: int = 100
    prediction: str = "epsilon"  # or "v_prediction" (model_io.use_prediction says why it is a choice)
    text_layers: int = 3  # transformer layers of the text encoder (0: every token's embedding is its own)


def world_vocab() -> list[int]:
    """Every token id the grammar can produce (plus BOS/EOS), i.e. the rows the text encoder may learn."""
    words = set("a photo of and on background".split()) | set(W.SHAPES) | set(W.OBJECT_COLOURS) | \
        set(W.BG_COLOURS) | set(W.TEXTURES) | set(W.SIZE_RANGES)
    ids = {M.BOS, M.EOS}
    for w in words:
        ids.update(M.token_ids(w)[1:-1])
    return sorted(ids)


def zero_unused_rows(text, keep: list[int]) -> None:
    emb = text.get_input_embeddings().weight
    with torch.no_grad():
        mask = torch.ones(emb.shape[0], dtype=torch.bool)
        mask[keep] = False
        emb[mask] = 0


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


OBJECT_WEIGHT = 5.0  # loss weight of object pixels (grown by 1 px) against background pixels


def vae_batch(rng, n: int):
    """(images in [-1, 1], per-pixel loss weights): objects are a few percent of the pixels but carry the shape,
    colour and identity the benchmark reads, so their pixels weigh OBJECT_WEIGHT times more."""
    sc = [W.vae_scene(rng) for _ in range(n)]
    w = np.stack([1.0 + (OBJECT_WEIGHT - 1.0) * W.subject_mask(s, dilate=1) for s in sc]).astype(np.float32)
    return to_tensor(W.render_batch(sc)), torch.from_numpy(w)[:, None]


def weighted_loss(y, x, w) -> torch.Tensor:
    d = y.float() - x
    return ((d.abs() + d * d) * w).sum() / (w.sum() * 3)


def autocast(precision: str):
    """The forward passes' precision: fp32, or bf16 autocast on the CPU (oneDNN's AMX / AVX512-BF16 kernels)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    raise ValueError(f"precision {precision!r}: use fp32 or bf16")


def vae_step(vae, opt, x, wmap, precision: str, encoder: bool = True) -> float:
    """One optimiser step of the reconstruction loss through the posterior mode (deterministic, like ComfyUI's
    encode), tiny KL; `encoder=False` (stage 3) keeps the latents fixed."""
    with contextlib.nullcontext() if encoder else torch.no_grad(), autocast(precision):
        post = vae.encode(x).latent_dist
        z = post.mode()
    with autocast(precision):
        y = vae.decode(z).sample
    loss = weighted_loss(y, x, wmap)
    if encoder:
        loss = loss + 1e-7 * post.kl().float().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def unet_step(unet, text, opt, params, sched, x0, t, noise, ids, precision: str, edit_context=None) -> float:
    """One optimiser step of min-SNR-weighted epsilon (or v) prediction, text encoder and UNet together;
    `edit_context(ids, ctx)` may replace the text states first (a trial's, e.g. toyworld/trial_constant_padding)."""
    xt = sched.add_noise(x0, noise, t)
    with autocast(precision):
        ctx = text(ids)[0]
        if edit_context is not None:
            ctx = edit_context(ids, ctx)
        out = unet(xt, t, encoder_hidden_states=ctx).sample
    target = M.training_target(x0, noise, sched.alphas_cumprod[t])
    loss = (snr_weights(sched.alphas_cumprod, t) * ((out.float() - target) ** 2).mean(dim=(1, 2, 3))).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.item()


def train_vae(vae, cfg: Config, log: dict) -> None:
    """L1 + L2 reconstruction (vae_step); every vae_eval_every steps the held-out PSNR and the detector on
    reconstructions (the ceiling generations can reach), stopping early once that reaches cfg.vae_ceiling.

    Whole 64 px images: the decoder's GroupNorms remove each group's mean, so absolute colours reach the output
    only through spatial context (the image border, other regions), which crops would cut away."""
    rng = np.random.default_rng(cfg.seed + 1)
    val = W.render_batch(W.scenes(cfg.seed + 901, 16, "heldout"))
    opt = torch.optim.AdamW(vae.parameters(), cfg.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    total = cfg.vae_steps
    curve, t0, c0 = [], time.time(), time.process_time()
    for step in range(1, total + 1):
        lr = cfg.vae_lr * min(1.0, step / 100) * (0.5 * (1 + math.cos(math.pi * step / total)) * 0.9 + 0.1)
        for g in opt.param_groups:
            g["lr"] = lr
        x, wmap = vae_batch(rng, cfg.vae_batch)
        loss = vae_step(vae, opt, x, wmap, cfg.vae_precision)
        if step % cfg.vae_eval_every == 0 or step == total:
            vae.eval()
            rec = S.decode(vae, S.encode(vae, val))
            ceiling = reconstruction_readable(vae, cfg)
            vae.train()
            p = float(np.mean([S.psnr(a, b) for a, b in zip(rec, val)]))
            curve.append({"step": step, "loss": round(loss, 5), "heldout_psnr_db": round(p, 2),
                          "readable": {k: round(v, 4) for k, v in ceiling.items()},
                          "seconds": round(time.time() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1)})
            print(f"[vae] step {step}/{total} loss {loss:.4f} held-out PSNR {p:.2f} dB, detector reads "
                  f"{ceiling['all']:.0%} of reconstructions (shape {ceiling['shape']:.0%}, colour "
                  f"{ceiling['colour']:.0%}), the concept in {ceiling['concept']:.0%} ({time.time() - t0:.0f} s)",
                  flush=True)
            if cfg.vae_ceiling and ceiling["all"] >= cfg.vae_ceiling:
                print(f"[vae] the detector reads {ceiling['all']:.0%} >= {cfg.vae_ceiling:.0%}: stage done",
                      flush=True)
                break
    log["vae"] = {"curve": curve, "steps": step, "seconds": round(time.time() - t0, 1),
                  "cpu_seconds": round(time.process_time() - c0, 1)}


def train_decoder(vae, cfg: Config, log: dict) -> None:
    """Stage 3: fine-tune the decoder with the encoder frozen (as SD's ft-MSE VAE was made): the latents the UNet was
    trained on stay exactly what they were, only their decoding gets sharper."""
    rng = np.random.default_rng(cfg.seed + 6)
    val = W.render_batch(W.scenes(cfg.seed + 901, 16, "heldout"))
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, cfg.decoder_lr, betas=(0.9, 0.99), weight_decay=0.0)
    curve, t0, c0 = [], time.time(), time.process_time()
    for step in range(1, cfg.decoder_steps + 1):
        for g in opt.param_groups:
            g["lr"] = cfg.decoder_lr * (0.5 * (1 + math.cos(math.pi * step / cfg.decoder_steps)) * 0.9 + 0.1)
        x, wmap = vae_batch(rng, cfg.vae_batch)
        loss = vae_step(vae, opt, x, wmap, cfg.vae_precision, encoder=False)
        if step % 100 == 0 or step == cfg.decoder_steps:
            with torch.no_grad():
                rec = S.decode(vae, S.encode(vae, val))
                ceiling = reconstruction_readable(vae, cfg)
            p = float(np.mean([S.psnr(a, b) for a, b in zip(rec, val)]))
            curve.append({"step": step, "loss": round(loss, 5), "heldout_psnr_db": round(p, 2),
                          "readable": {k: round(v, 4) for k, v in ceiling.items()},
                          "seconds": round(time.time() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1)})
            print(f"[decoder] step {step}/{cfg.decoder_steps} loss {loss:.4f} held-out PSNR {p:.2f} dB, detector "
                  f"reads {ceiling['all']:.0%} of reconstructions, the concept in {ceiling['concept']:.0%} "
                  f"({time.time() - t0:.0f} s)", flush=True)
            if cfg.vae_ceiling and ceiling["all"] >= cfg.vae_ceiling:
                print(f"[decoder] the detector reads {ceiling['all']:.0%} >= {cfg.vae_ceiling:.0%}: stage done",
                      flush=True)
                break
    vae.requires_grad_(False)
    log["decoder"] = {"curve": curve, "seconds": round(time.time() - t0, 1),
                      "cpu_seconds": round(time.process_time() - c0, 1)}


def decoder_stage(args, cfg: Config) -> int:
    """`--stage decoder`: stage 3 alone on an existing base folder (its VAE file is rewritten, the log extended)."""
    vae, _text, _unet = M.load_diffusers_folder(args.out / M.BASE_NAME)
    log_path = args.out / "training_log.json"
    log = json.loads(log_path.read_text())
    train_decoder(vae, cfg, log)
    M.save_vae(args.out / M.BASE_NAME, vae)
    log["config"]["decoder_steps"], log["config"]["decoder_lr"] = cfg.decoder_steps, cfg.decoder_lr
    log["decoder"]["machine"] = machine()
    log_path.write_text(json.dumps(log, indent=1) + "\n")
    print(f"[done] decoder of {args.out / M.BASE_NAME} fine-tuned", flush=True)
    return 0


@torch.no_grad()
def calibrate_latents(vae, images: np.ndarray) -> dict:
    """Fold a per-channel affine into the VAE so that mode latents x SCALE have mean 0 and std 1 per channel."""
    z = torch.cat([vae.encode(to_tensor(images[i:i + 32])).latent_dist.mode() for i in range(0, len(images), 32)])
    mean, std = z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3))
    c = 1.0 / (M.SCALE * std)  # z' = c (z - mean)
    q, p = vae.quant_conv, vae.post_quant_conv
    q.weight[:4] *= c[:, None, None, None]
    q.bias[:4] = (q.bias[:4] - mean) * c
    q.bias[4:] += 2 * torch.log(c)  # log-variance follows the scale
    p.bias += (p.weight[:, :, 0, 0] @ mean)
    p.weight /= c[None, :, None, None]
    return {"channel_mean": mean.tolist(), "channel_std": std.tolist()}


def encode_training_set(vae, cfg: Config):
    """(latents, scenes) of the training split; the VAE in eval mode."""
    t0 = time.time()
    train = [W.sample_scene(np.random.default_rng([cfg.seed, 2, i])) for i in range(cfg.n_train)]
    lat = torch.cat([S.encode(vae, W.render_batch(train[i:i + 256])) for i in range(0, len(train), 256)])
    print(f"[data] {len(train)} training latents in {time.time() - t0:.0f} s; std {lat.std():.3f}", flush=True)
    return lat, train


def ema_update(ema: dict, module, decay: float) -> None:
    with torch.no_grad():
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                ema[k].mul_(decay).add_(v, alpha=1 - decay)
            else:
                ema[k].copy_(v)


def heldout_prompts(cfg: Config, n: int | None = None) -> list[W.Scene]:
    """Held-out one-object scenes captioned with colour and shape (the acceptance prompts)."""
    rng = np.random.default_rng(cfg.seed + 77)
    out = []
    for _ in range(n or cfg.eval_prompts):
        sc = W.sample_scene(rng, "heldout")
        out.append(W.Scene(sc.bg, sc.texture, sc.phase, sc.objects, W.caption_of(sc, rng.random() < 0.5, True)))
    return out


EXTRA_EVAL_CFGS = (3.0, 5.0)  # the curve also reports these guidance scales (cheap: 32 prompts, 20 steps)


def eval_generations(unet, text, vae, cfg: Config, seed: int) -> dict:
    """Detector agreement of generations for held-out prompts (diffusers DDIM; the curve's points), at `eval_cfg`
    and, under "by_cfg", at EXTRA_EVAL_CFGS (which guidance the small model draws best at)."""
    from .metrics import generation_correct, summarise

    scenes_ = heldout_prompts(cfg)
    out = {}
    for scale in (cfg.eval_cfg,) + EXTRA_EVAL_CFGS:
        imgs = S.generate(unet, text, vae, [s.caption for s in scenes_], cfg.eval_steps, scale, seed)
        rows = [generation_correct(img, sc) for img, sc in zip(imgs, scenes_)]
        out[scale] = summarise(rows)
    return out[cfg.eval_cfg] | {"by_cfg": {f"{k:g}": v["shape_and_colour"] for k, v in out.items()}}


def reconstruction_readable(vae, cfg: Config) -> dict:
    """The detector on VAE reconstructions of held-out renders (the ceiling of what generations can score), and the
    fraction of concept renders whose reconstruction still shows the concept."""
    from .detector import detector_accuracy
    from .metrics import concept_rate

    scenes_ = heldout_prompts(cfg, 64)
    rec = S.decode(vae, S.encode(vae, W.render_batch(scenes_)))
    out = dict(detector_accuracy(scenes_, rec))
    # what the VAE cannot decode, no concept form can draw: the committed VAE reads the world at 98 % and shows the
    # concept in 25 % of these renders with 3 stripes (the middle one is lost), 91 % with 2 halves
    concept = W.scenes(cfg.seed + 903, 32, "any", concept=True)
    rec = S.decode(vae, S.encode(vae, W.render_batch(concept)))
    out["concept"] = concept_rate(rec)
    return out


def snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma loss weights: epsilon min(snr, gamma) / snr; v min(1, gamma / (snr + 1)) -- weight 1 (an x0
    error weighs 1 + snr) except at the low-noise end, where the easy steps would otherwise dominate."""
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    if M.SCHEDULER_CONFIG["prediction_type"] == "epsilon":
        return torch.clamp(snr, max=gamma) / snr
    return torch.clamp(gamma / (snr + 1), max=1.0)


def train_unet(unet, text, vae, latents, train, cfg: Config, log: dict) -> tuple[dict, dict]:
    """Joint text encoder + UNet training; returns the EMA state dicts (unet, text)."""
    sched = M.training_scheduler()
    keep = world_vocab()
    zero_unused_rows(text, keep)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, cfg.unet_lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema_u = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    ema_t = {k: v.detach().clone() for k, v in text.state_dict().items()}
    rng, gen = np.random.default_rng(cfg.seed + 3), torch.Generator().manual_seed(cfg.seed + 3)
    cache, curve, evals, t0 = {}, [], [], time.time()
    total, run = cfg.unet_steps, 0.0
    for step in range(1, total + 1):
        lr = cfg.unet_lr * min(1.0, step / 200) * (0.5 * (1 + math.cos(math.pi * step / total)) * 0.95 + 0.05)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = rng.integers(0, len(train), cfg.unet_batch)
        caps = [W.with_caption(train[i], rng).caption if rng.random() > cfg.drop_caption else "" for i in idx]
        x0 = latents[torch.from_numpy(idx)]
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        loss = unet_step(unet, text, opt, params, sched, x0, t, noise, M.tokenize(caps, cache), cfg.unet_precision)
        decay = min(cfg.ema, (1 + step) / (10 + step))
        ema_update(ema_u, unet, decay)
        ema_update(ema_t, text, decay)
        run = 0.98 * run + 0.02 * loss if step > 1 else loss
        if step % 100 == 0:
            curve.append({"step": step, "loss_ema": round(run, 5), "seconds": round(time.time() - t0, 1)})
        if step % cfg.eval_every == 0 or step == total:
            acc = evaluate_ema(unet, text, vae, ema_u, ema_t, cfg, step)
            evals.append({"step": step, **acc, "seconds": round(time.time() - t0, 1)})
            print(f"[unet] step {step}/{total} loss {run:.4f} held-out shape+colour "
                  f"{acc['shape_and_colour']:.2%} (by cfg {acc['by_cfg']}) ({time.time() - t0:.0f} s)", flush=True)
    log["unet"] = {"curve": curve, "evals": evals, "seconds": round(time.time() - t0, 1)}
    return ema_u, ema_t


def evaluate_ema(unet, text, vae, ema_u, ema_t, cfg: Config, step: int) -> dict:
    live_u = {k: v.clone() for k, v in unet.state_dict().items()}
    live_t = {k: v.clone() for k, v in text.state_dict().items()}
    unet.load_state_dict(ema_u)
    text.load_state_dict(ema_t)
    unet.eval(), text.eval()
    acc = eval_generations(unet, text, vae, cfg, seed=step)
    unet.load_state_dict(live_u)
    text.load_state_dict(live_t)
    unet.train(), text.train()
    return acc


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average_start": os.getloadavg()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f, v in asdict(Config()).items():
        ap.add_argument("--" + f.replace("_", "-"), type=type(v), default=v)
    ap.add_argument("--out", type=Path, default=M.WEIGHTS)
    ap.add_argument("--reuse-vae", type=Path, default=None,
                    help="stage 1 cache: load the calibrated VAE (+ its log) from this file if it exists, else train "
                         "it and save it there; the UNet stage is seeded on its own, so a rerun with the cached VAE "
                         "trains the same UNet")
    ap.add_argument("--stage", choices=("all", "vae", "decoder"), default="all",
                    help="'vae': only stage 1, saved to --reuse-vae (a trial of the VAE settings); "
                         "'decoder': only stage 3, on the base folder already in --out")
    args = ap.parse_args(argv)
    cfg = Config(**{f: getattr(args, f) for f in asdict(Config())})
    torch.set_num_threads(cfg.threads)
    M.use_prediction(cfg.prediction)
    if args.stage == "decoder":
        return decoder_stage(args, cfg)
    if args.stage == "vae" and not args.reuse_vae:
        ap.error("--stage vae needs --reuse-vae FILE (where the VAE is saved)")
    log = {"config": asdict(cfg), "machine": machine()}
    t0 = time.time()
    vae, text, unet = M.new_models(cfg.seed, cfg.text_layers)
    if args.reuse_vae and args.reuse_vae.is_file():  # stage 1's result from an earlier run of this script
        from safetensors.torch import load_file

        vae.load_state_dict(load_file(str(args.reuse_vae)))
        vae.eval().requires_grad_(False)
        log.update(json.loads(args.reuse_vae.with_suffix(".json").read_text()))
        log["vae"]["reused_from"] = str(args.reuse_vae)
    else:
        train_vae(vae, cfg, log)
        vae.eval().requires_grad_(False)
        log["latent_calibration"] = calibrate_latents(vae, W.render_batch(W.scenes(cfg.seed + 5, 512)))
        if args.reuse_vae:
            from safetensors.torch import save_file

            args.reuse_vae.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(args.reuse_vae))
            stage = {k: log[k] for k in ("vae", "latent_calibration")}
            args.reuse_vae.with_suffix(".json").write_text(json.dumps(stage | {"vae_config": {
                k: v for k, v in asdict(cfg).items() if k.startswith("vae_")}}) + "\n")
    log["detector_on_vae_reconstructions"] = reconstruction_readable(vae, cfg)
    print(f"[vae] detector on reconstructions of held-out renders: {log['detector_on_vae_reconstructions']}",
          flush=True)
    if args.stage == "vae":
        return 0
    latents, train = encode_training_set(vae, cfg)
    ema_u, ema_t = train_unet(unet, text, vae, latents, train, cfg, log)
    unet.load_state_dict(ema_u)
    text.load_state_dict(ema_t)
    if cfg.decoder_steps:
        train_decoder(vae, cfg, log)
        log["detector_on_decoded_reconstructions"] = reconstruction_readable(vae, cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    M.save_diffusers_folder(args.out / M.BASE_NAME, vae, text, unet)
    log["seconds_total"] = round(time.time() - t0, 1)
    log["cpu_seconds_total"] = round(time.process_time(), 1)
    log["machine"]["load_average_end"] = os.getloadavg()
    (args.out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"[done] {args.out / M.BASE_NAME} in {log['seconds_total'] / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
