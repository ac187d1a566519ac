"""Teach the base model a subject the world does not have, "sks square" (left half yellow, right half blue), three ways.

One command (seeded; needs toyworld/weights/toyworld_base from train_base):

    .venv/bin/python -m toyworld.train_concept

From INSTANCES rendered images of the striped square (captioned "a photo of a sks square on a <bg> background"):
- DreamBooth (UNet + text encoder) with prior preservation: class images are the base model's own generations for
  "a photo of a square on a <bg> background", their loss weighted 1 (DreamBooth's lambda) -> a diffusers folder
  `toyworld_sks_square` with concept.json (the Concept Loader reads the words from it);
- DreamBooth-LoRA (rank 4 on every UNet attention projection, same data and prior) -> kohya-format safetensors
  with `photoswap.concept_words` metadata, applied by the Concept Loader's `lora` source on the base model;
- textual inversion (one 32-wide vector, base model frozen) -> `emb_params` safetensors for the `embedding` source.
Why all three: they are the forms the Concept Loader reads, and the benchmark compares how well each carries the
identity (textual inversion cannot teach a frozen model a texture it never made; the numbers show it).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import model_io as M
from . import sampling as S
from . import scene as W

INSTANCES = 10
CLASS_IMAGES = 48
SKS = 48136  # CLIP id of "sks"
DEFAULT_SEED = 0
# where the instances sit: cells of a 3 x 3 grid over the frame (column, row), the centre twice
INSTANCE_CELLS = ((0, 0), (2, 0), (1, 1), (0, 2), (2, 2), (1, 0), (0, 1), (2, 1), (1, 2), (1, 1))


def instance_data(seed: int = DEFAULT_SEED):
    """(scenes, uint8 images) of the concept (`seed`: the run's --seed). Why this layout: trained on 8 instances at
    random places and backgrounds, the concept was drawn near those places (toyworld/probe_concept_places; the first
    concept in docs/quality.md), so the instances cover every background colour twice and spread over the frame."""
    rng = np.random.default_rng(seed + 10)
    out = []
    for k, (gx, gy) in enumerate(INSTANCE_CELLS):
        bg, texture = list(W.BG_COLOURS)[k % 5], W.TEXTURES[(k + k // 5) % 3]
        sc = W.with_caption(W.sample_scene(rng, "any", concept=True, bg=bg, texture=texture), rng)
        obj = sc.objects[0]
        free = W.SIZE - 2 * W.MARGIN - obj.side  # the range of centres that keeps the margin
        obj = replace(obj, cx=W.MARGIN + obj.side / 2 + free * gx / 2, cy=W.MARGIN + obj.side / 2 + free * gy / 2)
        out.append(replace(sc, objects=(obj,)))
    return out, W.render_batch(out)


def class_data(unet, text, vae, seed: int):
    """(prompts, latents) of the prior: the base model's own squares."""
    rng = np.random.default_rng(seed)
    bgs = [(str(rng.choice(list(W.BG_COLOURS))), str(rng.choice(W.TEXTURES))) for _ in range(CLASS_IMAGES)]
    prompts = [f"a photo of a square {W.background_phrase(b, t)}" for b, t in bgs]
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(M.SCHEDULER_CONFIG)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((len(prompts), 4, W.SIZE // 8, W.SIZE // 8), generator=gen)
    null = S.encode_text(text, M.tokenize([""]))
    cond = S.encode_text(text, M.tokenize(prompts))
    ctx = torch.cat([null.expand(len(x), -1, -1), cond])
    sched.set_timesteps(20)
    with torch.no_grad():
        for t in sched.timesteps:
            e_u, e_c = unet(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample.chunk(2)
            x = sched.step(e_u + 7.5 * (e_c - e_u), t, x).prev_sample
    return prompts, x


class LoRALinear(torch.nn.Module):
    """y = W x + (alpha / rank) * up(down(x)); `up` starts at zero so training starts from the base model."""

    def __init__(self, base: torch.nn.Linear, rank: int = 4, alpha: float = 4.0):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.down = torch.nn.Linear(base.in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.normal_(self.down.weight, std=1.0 / rank)
        torch.nn.init.zeros_(self.up.weight)
        self.rank, self.alpha = rank, alpha

    def forward(self, x):
        return self.base(x) + self.up(self.down(x)) * self.scale


def add_lora(unet, rank: int = 4) -> dict:
    """Wrap every attention projection of the UNet; returns {diffusers module name: LoRALinear}."""
    wrapped = {}
    for name, module in list(unet.named_modules()):
        for child in ("to_q", "to_k", "to_v"):
            if ".attn" in name and hasattr(module, child) and isinstance(getattr(module, child), torch.nn.Linear):
                lora = LoRALinear(getattr(module, child), rank)
                setattr(module, child, lora)
                wrapped[f"{name}.{child}"] = lora
        if ".attn" in name and hasattr(module, "to_out") and isinstance(module.to_out[0], torch.nn.Linear):
            lora = LoRALinear(module.to_out[0], rank)
            module.to_out[0] = lora
            wrapped[f"{name}.to_out.0"] = lora
    return wrapped


def save_lora(wrapped: dict, path: Path, words: str, class_word: str) -> None:
    """kohya keys (`lora_unet_<module>`), fp16, with the concept words in the safetensors header."""
    from safetensors.torch import save_file

    sd = {}
    for module, lora in wrapped.items():
        key = "lora_unet_" + module.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = lora.down.weight.detach().half().contiguous()
        sd[f"{key}.lora_up.weight"] = lora.up.weight.detach().half().contiguous()
        sd[f"{key}.alpha"] = torch.tensor(float(lora.alpha)).half()
    save_file(sd, str(path), metadata={"photoswap.concept_words": words, "photoswap.class_word": class_word})


def diffusion_loss(unet, ctx, x0, gen, acp) -> torch.Tensor:
    t = torch.randint(0, 1000, (len(x0),), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    a = acp[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return ((unet(xt, t, encoder_hidden_states=ctx).sample - M.training_target(x0, noise, acp[t])) ** 2).mean()


def finetune(unet, text, params, inst, cls, steps: int, lr: float, seed: int, prior: bool = True,
             embed_row=None, tag: str = "") -> list:
    """DreamBooth loop: each step one instance batch (+ one class batch when `prior`); returns the loss curve."""
    acp = M.training_scheduler().alphas_cumprod
    (i_ids, i_lat), (c_ids, c_lat) = inst, cls
    opt = torch.optim.AdamW(params, lr, weight_decay=0.0)
    gen, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    curve, t0, run = [], time.time(), None
    for step in range(1, steps + 1):
        ii = torch.from_numpy(rng.integers(0, len(i_lat), 4))
        loss = diffusion_loss(unet, text_ctx(text, i_ids[ii], embed_row), i_lat[ii], gen, acp)
        if prior:
            ci = torch.from_numpy(rng.integers(0, len(c_lat), 4))
            loss = loss + diffusion_loss(unet, text_ctx(text, c_ids[ci], embed_row), c_lat[ci], gen, acp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run = loss.item() if run is None else 0.95 * run + 0.05 * loss.item()
        if step % 50 == 0 or step == steps:
            curve.append({"step": step, "loss_ema": round(run, 5), "seconds": round(time.time() - t0, 1)})
            print(f"[{tag}] step {step}/{steps} loss {run:.4f} ({time.time() - t0:.0f} s)", flush=True)
    return curve


def text_ctx(text, ids, embed_row=None):
    """Text-encoder output; with `embed_row` (textual inversion) the 'sks' token embeds to that vector."""
    if embed_row is None:
        return text(ids)[0]
    emb_layer = text.get_input_embeddings()

    def hook(_module, args, out):
        return torch.where((args[0] == SKS)[..., None], embed_row.to(out.dtype).expand_as(out), out)

    handle = emb_layer.register_forward_hook(hook)
    try:
        return text(ids)[0]
    finally:
        handle.remove()


def concept_rate(unet, text, vae, seed: int, embed_row=None, n: int = 16) -> float:
    """Fraction of generations for 'a photo of a sks square on a <bg> background' in which the detector sees the
    concept (diffusers-side check for the log; the benchmark measures through ComfyUI)."""
    from . import metrics as Q

    rng = np.random.default_rng(seed)
    prompts = [f"a photo of a {W.CONCEPT_WORDS} {W.background_phrase(str(rng.choice(list(W.BG_COLOURS))), 'plain')}"
               for _ in range(n)]
    if embed_row is not None:
        emb_layer = text.get_input_embeddings()
        handle = emb_layer.register_forward_hook(
            lambda _m, a, out: torch.where((a[0] == SKS)[..., None], embed_row.expand_as(out), out))
    try:
        imgs = S.generate(unet, text, vae, prompts, steps=20, cfg=7.5, seed=seed)
    finally:
        if embed_row is not None:
            handle.remove()
    return Q.concept_rate(imgs)


def main(argv=None) -> int:
    import copy

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, default=M.WEIGHTS / M.BASE_NAME)
    ap.add_argument("--out", type=Path, default=M.WEIGHTS)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=500, help="DreamBooth and LoRA steps")
    ap.add_argument("--ti-steps", type=int, default=400)
    ap.add_argument("--db-lr", type=float, default=5e-4, help="DreamBooth learning rate (1e-4 never taught the concept)")
    ap.add_argument("--lora-lr", type=float, default=3e-3)
    ap.add_argument("--ti-lr", type=float, default=1e-2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    vae, text, unet = M.load_diffusers_folder(args.base)
    M.use_prediction(M.folder_prediction(args.base))  # the concept learns the base's own objective
    for m in (vae, text, unet):
        m.eval().requires_grad_(False)
    inst_scenes, inst_imgs = instance_data(args.seed)
    inst = (M.tokenize([s.caption for s in inst_scenes]), S.encode(vae, inst_imgs))
    cls_prompts, cls_lat = class_data(unet, text, vae, args.seed + 11)
    cls = (M.tokenize(cls_prompts), cls_lat)
    words = {"concept_words": W.CONCEPT_WORDS, "class_word": W.CONCEPT_CLASS}
    log = {"instances": [s.caption for s in inst_scenes], "class_prompts": cls_prompts[:8],
           "base_concept_rate": concept_rate(unet, text, vae, 5)}

    db_unet, db_text = copy.deepcopy(unet), copy.deepcopy(text)
    for m in (db_unet, db_text):
        m.train().requires_grad_(True)
    log["dreambooth"] = {"curve": finetune(db_unet, db_text, list(db_unet.parameters()) + list(db_text.parameters()),
                                           inst, cls, args.steps, args.db_lr, args.seed + 12, tag="dreambooth")}
    db_unet.eval(), db_text.eval()
    log["dreambooth"]["concept_rate"] = concept_rate(db_unet, db_text, vae, 5)
    M.save_diffusers_folder(args.out / M.CONCEPT_NAME, vae, db_text, db_unet, concept=words)
    del db_unet, db_text

    lora_unet = copy.deepcopy(unet)
    wrapped = add_lora(lora_unet)
    lora_params = [p for m in wrapped.values() for p in (m.down.weight, m.up.weight)]
    for p in lora_params:
        p.requires_grad_(True)
    log["lora"] = {"curve": finetune(lora_unet, text, lora_params, inst, cls, args.steps, args.lora_lr, args.seed + 13,
                                     tag="lora"), "modules": len(wrapped)}
    log["lora"]["concept_rate"] = concept_rate(lora_unet.eval(), text, vae, 5)
    save_lora(wrapped, args.out / M.LORA_NAME, W.CONCEPT_WORDS, W.CONCEPT_CLASS)
    del lora_unet

    row = text.get_input_embeddings().weight[M.token_ids(W.CONCEPT_CLASS)[1]].clone()
    vec = torch.nn.Parameter(row[None].clone())
    log["embedding"] = {"curve": finetune(unet, text, [vec], inst, cls, args.ti_steps, args.ti_lr, args.seed + 14,
                                          prior=False, embed_row=vec, tag="embedding")}
    log["embedding"]["concept_rate"] = concept_rate(unet, text, vae, 5, embed_row=vec.detach())
    from safetensors.torch import save_file

    emb_path = args.out / M.EMBEDDING_NAME
    save_file({"emb_params": vec.detach().half().contiguous()}, str(emb_path))
    emb_path.with_suffix(".json").write_text(json.dumps({"class_word": W.CONCEPT_CLASS}) + "\n")
    log["seconds_total"] = round(time.time() - t0, 1)
    (args.out / "concept_log.json").write_text(json.dumps(log, indent=1) + "\n")
    sizes = M.write_manifest(args.out)
    print(f"[done] concept forms in {log['seconds_total'] / 60:.1f} min; {sum(sizes.values()) / 1e6:.1f} MB of "
          f"weights under {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
