"""Swap-quality measurements on toy-world images, every one from the source scene's ground truth and the detector.

Why these: Photoswap promises three things -- the new subject (identity), in the old one's place and size (pose
kept), and the rest of the photo unchanged (background kept, nothing leaking out of the subject). Each becomes a
number here; `summarise` averages them over photos.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from . import detector as D
from . import scene as W
from .sampling import psnr

CHANGED = 24  # a pixel "changed" when one of its channels moved by more than this many levels
PLACE_TOL = 4.0  # pixels: the concept counts as "in place" within this distance of the old subject's centre
GROW = 2  # pixels added around subject masks before measuring "outside the subject"


def concept_rate(images) -> float:
    """Fraction of uint8 images in which the detector finds the concept (anywhere)."""
    return float(np.mean([any(d.colour == "concept" for d in D.detect(im).objects) for im in images]))


def swap_metrics(source: W.Scene, photo: np.ndarray, out: np.ndarray, colour: str = "concept",
                 shape: str | None = None) -> dict:
    """Metrics of one swapped image `out` against its source photo and scene (one subject). The new subject is what
    the detector reads as `colour` ("concept": the sks square; a world colour for an edit of the world, then also
    of `shape` when given)."""
    subject = source.objects[0]
    reading = D.detect(out)
    concepts = [d for d in reading.objects if d.colour == colour and shape in (None, d.shape)]
    best = min(concepts, key=lambda d: math.hypot(d.cx - subject.cx, d.cy - subject.cy)) if concepts else None
    outside = ~W.subject_mask(source, dilate=GROW)
    for d in reading.objects:
        outside &= ~ndimage.binary_dilation(d.mask, iterations=GROW)
    change = np.abs(out.astype(np.int16) - photo.astype(np.int16)).max(axis=2) > CHANGED
    old_kept = any(d.colour == subject.colour and d.shape == subject.shape and
                   math.hypot(d.cx - subject.cx, d.cy - subject.cy) <= PLACE_TOL * 2 for d in reading.objects)
    m = {"identity": best is not None,
         "identity_in_place": best is not None and math.hypot(best.cx - subject.cx, best.cy - subject.cy) <= PLACE_TOL,
         "place_error_px": math.hypot(best.cx - subject.cx, best.cy - subject.cy) if best else float("nan"),
         "size_error": abs(best.side - subject.side) / subject.side if best else float("nan"),
         "background_psnr_db": psnr(out, photo, outside) if outside.any() else float("nan"),
         "leakage": float(change[outside].mean()) if outside.any() else float("nan"),
         "old_subject_kept": old_kept,
         "objects_found": len(reading.objects)}
    return m


def summarise(rows: list[dict]) -> dict:
    """Mean of every metric over photos (rates for booleans; NaNs -- no concept found -- left out and counted;
    text, such as a reading, is not averaged)."""
    out = {"n": len(rows)}
    for key in rows[0] if rows else []:
        vals = [r[key] for r in rows]
        if isinstance(vals[0], str):
            continue
        if isinstance(vals[0], bool):
            out[key] = float(np.mean(vals))
        else:
            finite = [v for v in vals if not (isinstance(v, float) and math.isnan(v))]
            out[key] = float(np.mean(finite)) if finite else float("nan")
            if len(finite) < len(vals):
                out[f"{key}_n"] = len(finite)
    return out


def inversion_psnr(photo: np.ndarray, reconstruction: np.ndarray) -> float:
    return psnr(reconstruction, photo)


def generation_correct(img: np.ndarray, truth: W.Scene) -> dict:
    """Does a generation for `truth`'s caption show its (single) object's shape and colour, and its background?
    `read_as` says what the detector read instead ("nothing" when it found no object), to name a miss."""
    r = D.detect(img, max_objects=1)
    o = truth.objects[0]
    got = r.objects[0] if r.objects else None
    shape, colour = bool(got and got.shape == o.shape), bool(got and got.colour == o.colour)
    return {"shape": shape, "colour": colour, "shape_and_colour": shape and colour, "bg": r.bg == truth.bg,
            "read_as": f"{got.colour} {got.shape}" if got else "nothing"}


def other_object_metrics(source: W.Scene, photo: np.ndarray, out: np.ndarray, swapped: int = 0) -> dict:
    """Two-object scenes, one swapped: is the other object unchanged (PSNR over its grown mask vs the photo, and the
    detector still finds it, same shape and colour, in place), and does the concept take the swapped one's place?"""
    other = source.objects[1 - swapped]
    target = source.objects[swapped]
    reading = D.detect(out)
    x, y = W._grid()
    region = W.shape_sdf(other, x, y) <= GROW
    kept = any(d.colour == other.colour and d.shape == other.shape and
               math.hypot(d.cx - other.cx, d.cy - other.cy) <= PLACE_TOL for d in reading.objects)
    concept = [d for d in reading.objects if d.colour == "concept"]
    return {"other_psnr_db": psnr(out, photo, region), "other_kept": kept,
            "identity_in_place": any(math.hypot(d.cx - target.cx, d.cy - target.cy) <= PLACE_TOL for d in concept)}


def region_metrics(photo: np.ndarray, out: np.ndarray, region: np.ndarray, band: int = 8) -> dict:
    """A swap restricted to `region` (bool HxW): the changed-pixel fraction inside it and outside it (outside =
    beyond `band` pixels from it: one latent cell, where the VAE decoder may spread a change)."""
    change = np.abs(out.astype(np.int16) - photo.astype(np.int16)).max(axis=2) > CHANGED
    outside = ~ndimage.binary_dilation(region, iterations=band)
    return {"changed_inside": float(change[region].mean()), "changed_outside": float(change[outside].mean())}
