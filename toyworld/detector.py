"""An analytic detector for toy-world images: background, then each object's shape, colour, size, place and mask.

Why analytic: the world is defined by a handful of colours and three outlines, so a few measurements read them back
exactly on clean images (accuracy reported by `detector_accuracy`) and degrade gracefully on generated ones, with no
second trained model whose own errors would need measuring.

How: the background varies only with the row (plain / striped / gradient), and objects keep MARGIN pixels from the
border, so each row's background colour is read from the border columns. Pixels far from it are foreground;
connected components of the foreground are objects. Shape from the fill ratio of the bounding box (square ~1,
circle ~pi/4, triangle ~1/2), the top/bottom balance and, for a square drawn with pinched sides, its full corners;
colour from the nearest palette colour of the interior's
median; the concept (sks square) from its two stripe colours.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from . import scene as W

FG_THRESHOLD = 48.0  # RGB distance from the row's background that makes a pixel foreground
MIN_AREA = 30  # pixels; smaller components are noise
BORDER = 3


@dataclass(frozen=True)
class Detection:
    shape: str
    colour: str  # OBJECT_COLOURS name or "concept"
    size_word: str
    cx: float  # bounding-box centre
    cy: float
    side: float  # mean of bounding-box width and height
    area: int
    mask: np.ndarray
    concept_score: float  # fraction of interior pixels near one of the concept's two colours


@dataclass(frozen=True)
class Reading:
    bg: str
    texture: str
    objects: tuple[Detection, ...]  # left to right
    row_background: np.ndarray  # H x 3

    @property
    def foreground(self) -> np.ndarray:
        out = np.zeros((W.SIZE, W.SIZE), bool)
        for d in self.objects:
            out |= d.mask
        return out


def _nearest(colour: np.ndarray, palette: dict) -> tuple[str, float]:
    names = list(palette)
    dist = [float(np.linalg.norm(colour - np.array(palette[n], np.float32))) for n in names]
    i = int(np.argmin(dist))
    return names[i], dist[i]


def read_background(img: np.ndarray) -> tuple[np.ndarray, str, str]:
    """(per-row background colour H x 3, colour name, texture name)."""
    cols = np.concatenate([img[:, :BORDER], img[:, -BORDER:]], axis=1).astype(np.float32)
    rows = np.median(cols, axis=1)
    rows = ndimage.median_filter(rows, size=(3, 1), mode="nearest")
    name, _ = _nearest(rows.mean(0), W.BG_COLOURS)
    lum = rows.mean(1) - rows.mean()
    y = np.arange(len(lum), dtype=np.float32)
    slope = np.polyfit(y, lum, 1)[0] * len(lum)  # change over the image height
    resid = lum - np.polyval(np.polyfit(y, lum, 1), y)
    if slope < -0.5 * 2 * W.GRADIENT_AMPLITUDE and resid.std() < 8:
        texture = "gradient"
    elif resid.std() > 0.3 * W.STRIPE_AMPLITUDE:
        texture = "striped"
    else:
        texture = "plain"
    return rows, name, texture


CORNER = 0.15  # corner patches: this fraction of the bounding box's height and width
PINCHED_FILL, CORNERS_FILLED = 0.7, 0.5  # a square drawn with rounded or pinched sides: its box fill and corner fill


def _corners_filled(sub: np.ndarray) -> float:
    """Mean fill of the three fullest corner patches of a bounding box: near 1 for a square even when its sides are
    drawn pinched, 0 for a clean circle. CORNERS_FILLED = 0.5 (corners more full than empty) is the boundary;
    `toyworld.probe_shapes` measures both sides on generations and VAE round trips (docs/quality.md)."""
    h, w = sub.shape
    ky, kx = max(1, round(CORNER * h)), max(1, round(CORNER * w))
    fills = sorted(float(p.mean()) for p in (sub[:ky, :kx], sub[:ky, -kx:], sub[-ky:, :kx], sub[-ky:, -kx:]))
    return float(np.mean(fills[1:]))


def _shape_of(mask: np.ndarray, box) -> str:
    sl_y, sl_x = box
    sub = mask[sl_y, sl_x]
    h, w = sub.shape
    fill = sub.sum() / float(h * w)
    top, bottom = sub[: h // 2].sum(), sub[h - h // 2:].sum()
    balance = top / max(bottom, 1)
    if fill > 0.89:
        return "square"
    if fill < 0.66 or balance < 0.6:
        return "triangle"
    if fill > PINCHED_FILL and _corners_filled(sub) >= CORNERS_FILLED:
        return "square"
    return "circle"


def _object_colour(img: np.ndarray, mask: np.ndarray) -> tuple[str, float]:
    inner = ndimage.binary_erosion(mask, iterations=2)
    if inner.sum() < 10:
        inner = mask
    pix = img[inner].astype(np.float32)
    near = [np.linalg.norm(pix - np.array(c, np.float32), axis=1) < 60 for c in W.CONCEPT_COLOURS]
    fa, fb = float(near[0].mean()), float(near[1].mean())
    score = fa + fb
    if fa > 0.2 and fb > 0.2 and score > 0.6:
        return "concept", score
    name, _ = _nearest(np.median(pix, axis=0), W.OBJECT_COLOURS)
    return name, score


def detect(img: np.ndarray, max_objects: int = 2) -> Reading:
    """Read a uint8 HxWx3 toy-world image."""
    img = np.asarray(img)
    rows, bg, texture = read_background(img)
    diff = np.linalg.norm(img.astype(np.float32) - rows[:, None, :], axis=2)
    fg = ndimage.binary_opening(diff > FG_THRESHOLD, iterations=1)
    fg = ndimage.binary_fill_holes(fg)
    labels, n = ndimage.label(fg)
    found = []
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        mask = labels == i
        area = int(mask.sum())
        if area < MIN_AREA:
            continue
        h, w = box[0].stop - box[0].start, box[1].stop - box[1].start
        colour, score = _object_colour(img, mask)
        shape = _shape_of(mask, box)
        side = (h + w) / 2.0
        size_word = "small" if side < (W.SIZE_RANGES["small"][1] + W.SIZE_RANGES["large"][0]) / 2 else "large"
        found.append(Detection(shape, colour, size_word, (box[1].start + box[1].stop) / 2.0,
                               (box[0].start + box[0].stop) / 2.0, side, area, mask, score))
    found.sort(key=lambda d: -d.area)
    found = sorted(found[:max_objects], key=lambda d: d.cx)
    return Reading(bg, texture, tuple(found), rows)


def matches(reading: Reading, truth: W.Scene, place_tol: float = 8.0) -> dict:
    """Per-attribute agreement of a reading with a scene's truth (objects paired left to right)."""
    out = {"count": len(reading.objects) == len(truth.objects), "bg": reading.bg == truth.bg,
           "texture": reading.texture == truth.texture}
    pairs = list(zip(reading.objects, truth.objects)) if out["count"] else []
    out["shape"] = bool(pairs) and all(d.shape == o.shape for d, o in pairs)
    out["colour"] = bool(pairs) and all(d.colour == o.colour for d, o in pairs)
    out["size"] = bool(pairs) and all(d.size_word == o.size_word for d, o in pairs)
    out["place"] = bool(pairs) and all(np.hypot(d.cx - o.cx, d.cy - o.cy) <= place_tol for d, o in pairs)
    out["all"] = all(out.values())
    return out


def detector_accuracy(scene_list, images=None) -> dict:
    """Fraction of scenes whose every attribute the detector reads correctly (clean renders unless images given)."""
    images = W.render_batch(scene_list) if images is None else images
    keys = ("count", "bg", "texture", "shape", "colour", "size", "place", "all")
    tally = {k: 0 for k in keys}
    for img, sc in zip(images, scene_list):
        m = matches(detect(img), sc)
        for k in keys:
            tally[k] += int(m[k])
    return {k: tally[k] / len(scene_list) for k in keys} | {"n": len(scene_list)}
