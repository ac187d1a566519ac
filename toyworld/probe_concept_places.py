"""Where does a concept form draw its subject? Near its training instances (memorised places) or anywhere?

Why: in the toy world the swap keeps the place of a new subject the base model draws (bench/quality.py's world edit)
but not of the first DreamBooth concept; its generations looked as if the concept sits where its training instances sat.
This measures it, through the pack's Concept Loader and ComfyUI's KSampler:

    .venv/bin/python -m toyworld.probe_concept_places [--count 16] [--form dreambooth|lora|embedding] [--out FILE]

For `count` prompts "a photo of a sks square on a <background>" (random world backgrounds), the detector reads the
concept's centre in each generation; `to_instance_px` is its distance to the nearest training-instance centre
(toyworld/train_concept.py's instances, checked against concept_log.json). The reference is the same distance for
`count` places the world itself draws for a square (`world_to_instance_px`): a concept that is drawn anywhere has
about that; a memorised one has much less.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from . import detector as D
from . import harness as H
from . import model_io as M
from . import scene as W
from .train_base import machine
from .train_concept import instance_data

STEPS = 20
CFG = 7.5


def instance_centres() -> list[tuple[float, float]]:
    """The committed concept's training-instance centres; refuses when they are not the instances it was trained on."""
    scenes, _ = instance_data()
    log = json.loads((M.WEIGHTS / "concept_log.json").read_text())
    if [sc.caption for sc in scenes] != log["instances"]:
        raise RuntimeError("toyworld/weights/concept_log.json lists other instances than train_concept's default "
                           "seed: retrain the concept with the defaults, or pass its instances here")
    return [(sc.objects[0].cx, sc.objects[0].cy) for sc in scenes]


def nearest(places: list[tuple[float, float]], to: list[tuple[float, float]]) -> list[float]:
    return [min(math.hypot(x - a, y - b) for a, b in to) for x, y in places]


def probe(count: int, form: str, seed: int) -> dict:
    H.boot()
    loaded = H.load_concept(form)
    inst = instance_centres()
    rng = np.random.default_rng(seed)
    found, prompts = [], []
    for i in range(count):
        bg, texture = str(rng.choice(list(W.BG_COLOURS))), str(rng.choice(W.TEXTURES))
        prompt = f"a photo of a {loaded.words} on a {W.background_phrase(bg, texture)}"
        image = H.generate(loaded, prompt, seed + i, STEPS, CFG)
        concepts = [d for d in D.detect(image).objects if d.colour == "concept"]
        prompts.append(prompt)
        found += [(d.cx, d.cy) for d in concepts[:1]]
    world = [(sc.objects[0].cx, sc.objects[0].cy)
             for sc in W.scenes(seed + 1, count, "any", shape=W.CONCEPT_CLASS, n_objects=1)]
    gen_d, world_d = nearest(found, inst), nearest(world, inst)
    return {"form": form, "how": loaded.how, "count": count, "steps": STEPS, "cfg": CFG, "seed": seed,
            "instances": inst, "concept_found": len(found) / count, "concept_places": found,
            "to_instance_px": gen_d, "to_instance_px_median": float(np.median(gen_d)) if gen_d else float("nan"),
            "world_places": world, "world_to_instance_px": world_d,
            "world_to_instance_px_median": float(np.median(world_d)), "prompts": prompts, "machine": machine()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=16)
    ap.add_argument("--form", default="dreambooth", choices=("dreambooth", "lora", "embedding"))
    ap.add_argument("--seed", type=int, default=3030)
    ap.add_argument("--out", type=Path, help="also write the figures here (json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    result = probe(args.count, args.form, args.seed)
    print(f"{args.form}: concept found in {result['concept_found']:.0%} of {args.count} generations; median distance "
          f"to the nearest training instance {result['to_instance_px_median']:.1f} px (the world's own square "
          f"places: {result['world_to_instance_px_median']:.1f} px)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
