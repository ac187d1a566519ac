"""How the detector tells squares from circles on what the toy model draws, not only on clean renders.

Why: the base model draws many squares with pinched or rounded sides; the box-fill rule alone read them as circles,
so the generation accuracy measured the detector as much as the model. The detector now also looks at the box's
corners (`detector._corners_filled`: the three fullest corner patches' mean fill, threshold `CORNERS_FILLED`). This
reports, per true shape, the box fill and the corner fill the detector sees, and what it reads, on the base model's
generations for held-out prompts (ComfyUI KSampler, as bench/quality.py) and on VAE round trips of held-out renders:

    .venv/bin/python -m toyworld.probe_shapes [--count 96] [--out FILE]

A corner threshold is safe when every circle's corner fill stays below it (`corner_fill_max` of circles).
"""
from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np
import torch

from . import detector as D
from . import harness as H
from . import scene as W
from .train_base import machine

STEPS = 20


def box_figures(img: np.ndarray) -> dict | None:
    """What the detector read for the largest object, with its box fill and corner fill (None: no object)."""
    found = D.detect(img, max_objects=1).objects
    if not found:
        return None
    ys, xs = np.nonzero(found[0].mask)
    box = found[0].mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    return {"read": found[0].shape, "fill": float(box.mean()), "corner_fill": D._corners_filled(box)}


def by_shape(scenes, images) -> dict:
    """Per true shape: how often each shape was read, and the range of box and corner fill."""
    rows = collections.defaultdict(list)
    for sc, img in zip(scenes, images):
        rows[sc.objects[0].shape].append(box_figures(img))
    out = {}
    for shape, figs in sorted(rows.items()):
        seen = [f for f in figs if f]
        out[shape] = {"n": len(figs), "read_as": dict(collections.Counter(f["read"] if f else "nothing"
                                                                         for f in figs).most_common())}
        for key in ("fill", "corner_fill") if seen else ():
            out[shape] |= {f"{key}_min": min(f[key] for f in seen), f"{key}_max": max(f[key] for f in seen)}
    return out


def probe(count: int, seed: int) -> dict:
    H.boot()
    loaded = H.load_concept("base")
    prompts = W.scenes(seed, count, "heldout", n_objects=1)
    prompts = [W.Scene(sc.bg, sc.texture, sc.phase, sc.objects, W.caption_of(sc, False, True)) for sc in prompts]
    generated = [H.generate(loaded, sc.caption, seed + i, STEPS) for i, sc in enumerate(prompts)]
    renders = W.scenes(seed + 1, count, "heldout", n_objects=1)
    trips = [H.decode(loaded.vae, H.encode(loaded.vae, W.render(sc))) for sc in renders]
    return {"count": count, "seed": seed, "steps": STEPS, "corner_threshold": D.CORNERS_FILLED,
            "generated": by_shape(prompts, generated), "vae_round_trips": by_shape(renders, trips),
            "machine": machine()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=96)
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--out", type=Path, help="also write the figures here (json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    result = probe(args.count, args.seed)
    for kind in ("generated", "vae_round_trips"):
        for shape, f in result[kind].items():
            ranges = (f"; box fill {f['fill_min']:.2f}-{f['fill_max']:.2f}, corner fill {f['corner_fill_min']:.2f}-"
                      f"{f['corner_fill_max']:.2f}" if "fill_min" in f else "")
            print(f"{kind:16s} {shape:8s} n={f['n']:3d} read as {f['read_as']}{ranges}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
