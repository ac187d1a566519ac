"""The toy world: seeded scenes of flat shapes on textured backgrounds, their captions and their ground truth.

Why it exists: no trained Stable Diffusion weights can be downloaded here, so quality is measured in a world small
enough to train a model on a CPU, where the truth of every image (shape, colour, size, place, background, masks) is
known exactly. Everything here is pure numpy and deterministic from a seed.

A scene is 64x64 RGB: a background (one of BG_COLOURS, texture plain / striped / gradient; the stripes' phase is
random and not captioned, so only a method that keeps the photo's background can reproduce it) and one or two
objects (SHAPES x OBJECT_COLOURS, small or large, anywhere; with two, the first is on the left). The concept of the
DreamBooth experiment, "sks square", is a square whose left half is yellow and right half blue: no world object is
textured (every world object has one flat colour), so the detector tells it apart from every world object by its two
colours. (Three orange/cyan/orange stripes were tried first: the trained VAE decodes a 5-9 px middle stripe on 25 %
of concept renders, halves on 91 %; docs/quality.md.)
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import numpy as np

SIZE = 64
MARGIN = 4  # objects keep this many pixels from the border (the detector reads the background at the border)
SHAPES = ("circle", "square", "triangle")
OBJECT_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 90, 230), "yellow": (240, 210, 40),
                  "purple": (150, 60, 200), "white": (240, 240, 240)}
BG_COLOURS = {"gray": (120, 120, 120), "black": (30, 30, 30), "brown": (115, 75, 45), "navy": (25, 35, 95),
              "beige": (205, 190, 150)}
TEXTURES = ("plain", "striped", "gradient")
SIZE_RANGES = {"small": (14, 18), "large": (22, 28)}  # side of the object's bounding box in pixels
CONCEPT_COLOURS = (OBJECT_COLOURS["yellow"], OBJECT_COLOURS["blue"])  # the concept's stripes, left to right
CONCEPT_STRIPES = 2  # halves: an 8x downscaling VAE keeps them (a latent cell is 8 px)
CONCEPT_WORDS = "sks square"
CONCEPT_CLASS = "square"
STRIPE_AMPLITUDE, STRIPE_PERIOD, GRADIENT_AMPLITUDE = 22.0, 20.0, 30.0
HELD_OUT_FRACTION = 0.15


@dataclass(frozen=True)
class WorldObject:
    shape: str
    colour: str  # an OBJECT_COLOURS name, or "concept" for the sks square
    size_word: str  # "small" / "large"
    cx: float  # centre of the bounding box, pixels
    cy: float
    side: float  # bounding-box side, pixels
    stripes: tuple = ()  # VAE training only: ((r, g, b), (r, g, b), count) vertical stripes instead of the colour

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        h = self.side / 2
        return self.cx - h, self.cy - h, self.cx + h, self.cy + h


@dataclass(frozen=True)
class Scene:
    bg: str
    texture: str
    phase: float  # stripe phase in pixels (texture "striped")
    objects: tuple[WorldObject, ...]
    caption: str = ""
    words: dict = field(default_factory=dict, compare=False)  # which attributes the caption names


def combo_held_out(colour: str, shape: str, bg: str, texture: str) -> bool:
    """The held-out (colour, shape, background, texture) combinations: never rendered for training, ~15 %."""
    digest = hashlib.sha256(f"{colour}|{shape}|{bg}|{texture}".encode()).digest()
    return digest[0] < int(256 * HELD_OUT_FRACTION)


def held_out_combos() -> list[tuple[str, str, str, str]]:
    return [(c, s, b, t) for c in OBJECT_COLOURS for s in SHAPES for b in BG_COLOURS for t in TEXTURES
            if combo_held_out(c, s, b, t)]


# ---- captions ------------------------------------------------------------------------------------------------------
def background_phrase(bg: str, texture: str) -> str:
    return f"on a {bg} background" if texture == "plain" else f"on a {bg} {texture} background"


def object_phrase(obj: WorldObject, with_size: bool, with_colour: bool) -> str:
    if obj.colour == "concept":
        return CONCEPT_WORDS
    words = ([obj.size_word] if with_size else []) + ([obj.colour] if with_colour else []) + [obj.shape]
    return " ".join(words)


def caption_of(scene: Scene, with_size: bool = False, with_colour: bool = True) -> str:
    """'a photo of a small red circle on a gray striped background' / '... a red circle and a blue square ...'."""
    phrases = [object_phrase(o, with_size and len(scene.objects) == 1, with_colour) for o in scene.objects]
    return f"a photo of a {' and a '.join(phrases)} {background_phrase(scene.bg, scene.texture)}"


def with_caption(scene: Scene, rng: np.random.Generator) -> Scene:
    """Caption from the grammar: the size word half the time (one object), the colour 85 % of the time."""
    with_size = bool(rng.random() < 0.5)
    with_colour = bool(rng.random() < 0.85)
    text = caption_of(scene, with_size, with_colour)
    return replace(scene, caption=text, words={"size": with_size and len(scene.objects) == 1, "colour": with_colour})


# ---- sampling ------------------------------------------------------------------------------------------------------
def _object(rng, shape, colour, size_word, x_range=(0.0, SIZE)) -> WorldObject:
    lo, hi = SIZE_RANGES[size_word]
    side = float(rng.uniform(lo, hi))
    h = side / 2
    cx = float(rng.uniform(max(x_range[0], MARGIN) + h, min(x_range[1], SIZE - MARGIN) - h))
    cy = float(rng.uniform(MARGIN + h, SIZE - MARGIN - h))
    return WorldObject(shape, colour, size_word, cx, cy, side)


def sample_scene(rng: np.random.Generator, split: str = "train", n_objects: int | None = None,
                 concept: bool = False, shape: str | None = None, colour: str | None = None,
                 bg: str | None = None, texture: str | None = None) -> Scene:
    """One random scene. split 'train' avoids the held-out combinations, 'heldout' uses only them (one object);
    concept=True makes the (single) object the sks square. Fixed attributes may be given."""
    if n_objects is None:
        n_objects = 1 if (concept or split == "heldout" or rng.random() < 0.7) else 2
    for _ in range(1000):
        b = bg or str(rng.choice(list(BG_COLOURS)))
        t = texture or str(rng.choice(TEXTURES))
        if n_objects == 1:
            c = "concept" if concept else (colour or str(rng.choice(list(OBJECT_COLOURS))))
            s = CONCEPT_CLASS if concept else (shape or str(rng.choice(SHAPES)))
            fixed = bool(bg and texture and colour and shape)  # all fixed by the caller: take it as asked
            if not (concept or fixed or split == "any") and combo_held_out(c, s, b, t) != (split == "heldout"):
                continue
            objs = (_object(rng, s, c, str(rng.choice(list(SIZE_RANGES)))),)
        else:
            c1, c2 = rng.choice(list(OBJECT_COLOURS), size=2, replace=False)
            s1, s2 = str(rng.choice(SHAPES)), str(rng.choice(SHAPES))
            if split == "train" and (combo_held_out(str(c1), s1, b, t) or combo_held_out(str(c2), s2, b, t)):
                continue
            a = _object(rng, s1, str(c1), str(rng.choice(list(SIZE_RANGES))), (0, SIZE / 2))
            o = _object(rng, s2, str(c2), str(rng.choice(list(SIZE_RANGES))), (SIZE / 2, SIZE))
            if o.cx - a.cx < (a.side + o.side) / 2 + 3:
                continue
            objs = (a, o)
        return Scene(b, t, float(rng.uniform(0, STRIPE_PERIOD)), objs)
    raise ValueError(f"no scene fits split={split!r} and the fixed attributes")


def vae_scene(rng: np.random.Generator) -> Scene:
    """A training scene for the VAE only: the world, plus (30 %) an object painted with 2-4 vertical stripes of two
    random colours. The VAE must decode textures the world's objects lack (the concept, swapped images) -- as SD's
    VAE has seen everything -- while the UNet and the captions never see a textured object."""
    sc = sample_scene(rng, "any")
    if rng.random() >= 0.3:
        return sc
    i = int(rng.integers(len(sc.objects)))
    cols = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(2)]
    obj = replace(sc.objects[i], stripes=(cols[0], cols[1], int(rng.integers(2, 5))))
    return replace(sc, objects=sc.objects[:i] + (obj,) + sc.objects[i + 1:])


def scenes(seed: int, count: int, split: str = "train", **kwargs) -> list[Scene]:
    """`count` captioned scenes from one seed (the same seed gives the same list)."""
    rng = np.random.default_rng(seed)
    return [with_caption(sample_scene(rng, split, **kwargs), rng) for _ in range(count)]


# ---- rendering -----------------------------------------------------------------------------------------------------
_GRID = np.meshgrid(np.arange(SIZE, dtype=np.float32) + 0.5, np.arange(SIZE, dtype=np.float32) + 0.5)


def _grid():
    return _GRID  # x, y (read-only use)


def shape_sdf(obj: WorldObject, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance (pixels, negative inside) of the object's outline; the triangle points up."""
    h = obj.side / 2
    dx, dy = x - obj.cx, y - obj.cy
    if obj.shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - h
    if obj.shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - h
    # triangle with apex (cx, cy-h) and base from (cx-h, cy+h) to (cx+h, cy+h); edge normals (+-2, -1)/sqrt(5)
    right = (2.0 * dx - (dy + h)) / np.sqrt(5.0)
    left = (-2.0 * dx - (dy + h)) / np.sqrt(5.0)
    return np.maximum(np.maximum(right, left), dy - h)


def _window(obj: WorldObject, pad: int = 2) -> tuple[slice, slice]:
    x0, y0, x1, y1 = obj.bbox
    return (slice(max(0, int(y0) - pad), min(SIZE, int(np.ceil(y1)) + pad)),
            slice(max(0, int(x0) - pad), min(SIZE, int(np.ceil(x1)) + pad)))


def coverage(obj: WorldObject) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] (a one-pixel soft edge), computed inside the object's window only."""
    out = np.zeros((SIZE, SIZE), np.float32)
    sy, sx = _window(obj)
    x, y = _grid()
    out[sy, sx] = np.clip(0.5 - shape_sdf(obj, x[sy, sx], y[sy, sx]), 0.0, 1.0)
    return out


def object_mask(obj: WorldObject) -> np.ndarray:
    return coverage(obj) >= 0.5


def subject_mask(scene: Scene, dilate: int = 0) -> np.ndarray:
    """Union of the objects' masks, optionally grown by `dilate` pixels (for 'outside the subject')."""
    x, y = _grid()
    mask = np.zeros((SIZE, SIZE), bool)
    for obj in scene.objects:
        mask |= shape_sdf(obj, x, y) <= dilate
    return mask


def background(bg: str, texture: str, phase: float = 0.0) -> np.ndarray:
    """float32 HxWx3 in 0..255; textures vary only with the row (the detector relies on it)."""
    y = np.arange(SIZE, dtype=np.float32) + 0.5
    base = np.array(BG_COLOURS[bg], np.float32)
    if texture == "striped":
        shift = STRIPE_AMPLITUDE * np.sin(2 * np.pi * (y + phase) / STRIPE_PERIOD)
    elif texture == "gradient":
        shift = GRADIENT_AMPLITUDE * (1.0 - 2.0 * y / SIZE)
    else:
        shift = np.zeros_like(y)
    rows = np.clip(base[None, :] + shift[:, None], 0, 255)
    return np.repeat(rows[:, None, :], SIZE, axis=1)


def object_paint(obj: WorldObject, sy: slice, sx: slice) -> np.ndarray:
    """The object's colour over its window (the concept: three vertical stripes across its side)."""
    if obj.colour != "concept" and not obj.stripes:
        return np.array(OBJECT_COLOURS[obj.colour], np.float32)
    (ca, cb, n) = obj.stripes or (*CONCEPT_COLOURS, CONCEPT_STRIPES)
    x = np.arange(sx.start, sx.stop, dtype=np.float32) + 0.5
    stripe = np.clip(np.floor((x - (obj.cx - obj.side / 2)) / (obj.side / n)), 0, n - 1).astype(int) % 2
    a, b = np.array(ca, np.float32), np.array(cb, np.float32)
    row = np.where(stripe[:, None] == 0, a, b)
    return np.broadcast_to(row[None], (sy.stop - sy.start, sx.stop - sx.start, 3))


def render(scene: Scene) -> np.ndarray:
    """uint8 HxWx3 image of the scene."""
    img = background(scene.bg, scene.texture, scene.phase)
    x, y = _grid()
    for obj in scene.objects:
        sy, sx = _window(obj)
        a = np.clip(0.5 - shape_sdf(obj, x[sy, sx], y[sy, sx]), 0.0, 1.0)[..., None]
        img[sy, sx] = img[sy, sx] * (1 - a) + object_paint(obj, sy, sx) * a
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_batch(scene_list) -> np.ndarray:
    return np.stack([render(s) for s in scene_list])
