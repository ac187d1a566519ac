"""Probe how localised the subject word's cross-attention is in a trained toy base, as the pack's LocalBlend sees it.

Why: in the toy world LocalBlend changed nothing (shipped = LocalBlend off, to the digit). At 8×8 latents the blend
maps were 2×2 (fixed: `SDUNet.blend_level` now picks level 0 there), but the sampler's mask stayed all ones; this
script measures why, through the pack's own nodes (Prompt Pair, direct inversion, Attention Recorder, Swap Sampler):

    .venv/bin/python -m toyworld.probe_attention [--count 8] [--form dreambooth|base] [--out FILE]

Per held-out photo and attention level (8×8, 4×4, 2×2 tokens), from the recorded source queries and keys of the
cond row at steps 4 and 10 of 20, heads averaged:
- `mass_on_object`: the share of the subject column's attention mass on the object's cells, beside `object_cells`,
  the share of cells the object covers (a localised map has the first well above the second);
- `above_threshold`: cells whose map exceeds the blend threshold (0.3) of its max, before the 3×3 dilation;
- `attention_shares`: where each image token's attention goes on average (BOS, the caption's words, the subject
  word among them, the EOS and padding tokens);
and the Swap Sampler's own LocalBlend mask at the shipped windows: `mask_coverage` (fraction of latent cells kept
from the target) beside the object's area.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

from . import harness as H
from . import model_io as M
from . import scene as W
from .train_base import machine

STEPS = 20
PROBE_STEPS = (4, 10)
ROOT = Path(__file__).resolve().parent.parent


def level_maps(trace, positions: list, heads_of, tensor_kind, words: int) -> tuple[dict, dict]:
    """({side: [tokens², ...] maps of the subject columns}, {side: [token-group shares, ...]}) from the trace's
    cross queries/keys (cond row); `words` = the caption's tokens between BOS and the first EOS."""
    store = trace.store.tensors
    keys = {k.layer: v for k, v in store.items() if k.kind == tensor_kind.CROSS_K}
    out: dict = {}
    shares: dict = {}
    for key, q in store.items():
        if key.kind != tensor_kind.CROSS_Q or key.step not in PROBE_STEPS:
            continue
        k = keys[key.layer]
        q, k = q[-1].float(), (k if k.dim() == 2 else k[-1]).float()
        heads = heads_of(q.shape[-1])
        qh = q.reshape(q.shape[0], heads, -1).transpose(0, 1)
        kh = k.reshape(k.shape[0], heads, -1).transpose(0, 1)
        attn = torch.softmax(qh @ kh.transpose(-1, -2) / qh.shape[-1] ** 0.5, dim=-1).mean(0)  # [tokens, 77]
        side = int(round(attn.shape[0] ** 0.5))
        out.setdefault(side, []).append(attn[:, positions].sum(-1).reshape(side, side))
        mean = attn.mean(0)
        shares.setdefault(side, []).append({"bos": float(mean[0]), "subject": float(mean[positions].sum()),
                                            "caption_words": float(mean[1:1 + words].sum()),
                                            "eos_and_padding": float(mean[1 + words:].sum())})
    return out, shares


def probe(count: int, seed: int, form: str = "dreambooth") -> dict:
    pack = H.boot()
    tensor_kind = importlib.import_module(pack.__name__ + ".photoswap_core.trace").TensorKind
    sys.path.insert(0, str(ROOT / "bench"))
    import quality as QB  # the benchmark's shipped windows and target prompts

    loaded = H.load_concept(form)
    head_channels = int(loaded.model.model.model_config.unet_config.get("num_head_channels", 16))
    rows, per_level, per_share = [], {}, {}
    for sc in W.scenes(seed, count, "heldout"):
        photo = W.render(sc)
        src, tgt, neg, prompts = H.prompt_pair(loaded, sc.caption, sc.objects[0].shape, QB.target_prompt(sc))
        inv, _recon, _ = H.invert(loaded, H.encode(loaded.vae, photo), src, neg, "direct", STEPS)
        trace, _ = H.record(loaded, inv, src, neg, STEPS)
        obj = torch.from_numpy(W.object_mask(sc.objects[0]).astype(np.float32))[None, None]
        maps, shares = level_maps(trace, list(prompts.subjects[0].source_positions),
                                  lambda width: max(1, width // head_channels), tensor_kind,
                                  words=len(prompts.source_ids) - 2)
        for side, ss in shares.items():
            per_share.setdefault(side, []).extend(ss)
        for side, ms in maps.items():
            cells = torch.nn.functional.adaptive_avg_pool2d(obj, (side, side))[0, 0] > 0.2
            for m in ms:
                per_level.setdefault(side, []).append({
                    "mass_on_object": float((m * cells).sum() / m.sum()),
                    "object_cells": float(cells.float().mean()),
                    "above_threshold": float((m / m.max() > QB.SHIPPED["blend_threshold"]).float().mean())})
        sampler = H.node("swap_nodes", "PhotoswapAttentionSwapSampler")
        (_swapped, _source, mask, _pm), _ = H.run_node(sampler, model=loaded.model, trace=trace,
                                                       target_positive=tgt, negative=neg, prompts=prompts,
                                                       cfg=7.5, **QB.SHIPPED)
        rows.append({"caption": sc.caption, "object_area": float(obj.mean()),
                     "mask_coverage": float(mask.float().mean()), "blend_grid": list(trace.blend_grid or [])})
    levels = {f"{side}x{side}": {key: round(float(np.mean([r[key] for r in rs])), 3) for key in rs[0]}
              for side, rs in sorted(per_level.items(), reverse=True)}
    attention_shares = {f"{side}x{side}": {key: round(float(np.mean([r[key] for r in rs])), 3) for key in rs[0]}
                        for side, rs in sorted(per_share.items(), reverse=True)}
    return {"levels": levels, "attention_shares": attention_shares, "photos": rows,
            "mask_coverage": round(float(np.mean([r["mask_coverage"] for r in rows])), 3),
            "object_area": round(float(np.mean([r["object_area"] for r in rows])), 3),
            "meta": {"count": count, "seed": seed, "form": form, "steps": STEPS, "probe_steps": list(PROBE_STEPS),
                     "weights": str(M.WEIGHTS), "commit": QB.git_commit(), "machine": machine()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=8, help="held-out photos")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--form", default="dreambooth", choices=("dreambooth", "base"),
                    help="the model probed: the DreamBooth concept folder (the benchmark's) or the base folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the json here too")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = probe(args.count, args.seed, args.form)
    text = json.dumps(result, indent=1)
    print(json.dumps({k: result[k] for k in ("levels", "attention_shares", "mask_coverage", "object_area")}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
