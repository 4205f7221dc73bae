"""Scene specs, seeded scene sampling and a deterministic renderer for the offline "shapes" world.

A scene holds one or two objects (colour, shape, texture, size, centre) and the caption category it was
sampled for. All randomness lives in :func:`sample_scene` (positions, size jitter, texture phase are stored
in the scene), so :func:`render` is a pure function of the scene: the same scene gives the same pixels.
Rendering draws at 4x resolution and box-downsamples (cheap anti-aliasing).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (245, 225, 30),
    "green": (30, 165, 55),
    "blue": (35, 75, 225),
    "purple": (145, 45, 185),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "heart")
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted")
SIZES: tuple[str, ...] = ("small", "big")
#: Spatial relations of object 0 to object 1 in a two-object scene.
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
CATEGORIES: tuple[str, ...] = ("colour", "shape", "texture", "spatial", "size", "complex")

#: Mid-grey background: white and black objects both stand out on it.
BACKGROUND: tuple[int, int, int] = (128, 128, 128)
#: Object radius as a fraction of the image side, per size word.
SIZE_RADIUS: dict[str, float] = {"small": 0.12, "big": 0.19}
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ObjectSpec:
    """One object: its attributes and its geometry in unit image coordinates (y grows downwards)."""

    colour: str
    shape: str
    texture: str
    size: str
    x: float = 0.5
    y: float = 0.5
    scale: float = 1.0
    phase: float = 0.0

    @property
    def radius(self) -> float:
        """Radius in unit coordinates (size word times jitter)."""
        return SIZE_RADIUS[self.size] * self.scale


@dataclass(frozen=True)
class Scene:
    """A rendered-world scene. For two objects, ``relation`` is where object 0 sits relative to object 1."""

    objects: tuple[ObjectSpec, ...]
    category: str = "colour"
    relation: str | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def bindings(self) -> set[tuple[str, str]]:
        """The (colour, shape) pairs this scene shows."""
        return {(o.colour, o.shape) for o in self.objects}


def canonical_relation(a: str, relation: str, b: str) -> tuple[str, str, str]:
    """Normalise "A right of B" to ("B", "left of", "A") and "A below B" to ("B", "above", "A")."""
    if relation == "right of":
        return (b, "left of", a)
    if relation == "below":
        return (b, "above", a)
    return (a, relation, b)


@dataclass(frozen=True)
class Holdout:
    """Compositions withheld from prior training: colour-shape bindings and shape relations."""

    bindings: frozenset[tuple[str, str]] = frozenset()
    relations: frozenset[tuple[str, str, str]] = frozenset()

    def scene_is_held_out(self, scene: Scene) -> bool:
        """True when the scene shows any held-out binding or (two objects) a held-out shape relation."""
        if scene.bindings & self.bindings:
            return True
        if scene.relation is not None and len(scene.objects) == 2:
            rel = canonical_relation(scene.objects[0].shape, scene.relation, scene.objects[1].shape)
            return rel in self.relations
        return False


def _pick(rng: np.random.Generator, items: Iterable[str]) -> str:
    seq = list(items)
    return seq[int(rng.integers(len(seq)))]


def _place_two(rng: np.random.Generator, relation: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centres for object 0 and 1 such that |d_main| > |d_cross| and two big objects do not overlap."""
    near = float(rng.uniform(0.21, 0.30))
    far = float(rng.uniform(0.70, 0.79))
    c0, c1 = float(rng.uniform(0.40, 0.60)), float(rng.uniform(0.40, 0.60))
    if relation == "left of":
        return (near, c0), (far, c1)
    if relation == "right of":
        return (far, c0), (near, c1)
    if relation == "above":
        return (c0, near), (c1, far)
    return (c0, far), (c1, near)


def _random_object(rng: np.random.Generator, size: str | None = None) -> ObjectSpec:
    return ObjectSpec(
        colour=_pick(rng, COLOURS),
        shape=_pick(rng, SHAPES),
        texture=_pick(rng, TEXTURES),
        size=size if size is not None else _pick(rng, SIZES),
        scale=float(rng.uniform(0.92, 1.08)),
        phase=float(rng.uniform(0.0, 1.0)),
    )


def _draw_candidate(rng: np.random.Generator, category: str, force: tuple[str, str] | None) -> Scene:
    two_prob = {"colour": 0.7, "shape": 0.6, "texture": 0.6}.get(category, 1.0)
    n = 2 if rng.random() < two_prob else 1
    if n == 1:
        obj = _random_object(rng)
        if force is not None:
            obj = ObjectSpec(force[0], force[1], obj.texture, obj.size, scale=obj.scale, phase=obj.phase)
        x, y = rng.uniform(0.38, 0.62, size=2)
        obj = ObjectSpec(obj.colour, obj.shape, obj.texture, obj.size, float(x), float(y), obj.scale, obj.phase)
        return Scene((obj,), category, None)
    sizes: list[str | None] = [None, None]
    if category == "size":
        sizes = ["big", "small"] if rng.random() < 0.5 else ["small", "big"]
    a, b = _random_object(rng, sizes[0]), _random_object(rng, sizes[1])
    if force is not None:
        a = ObjectSpec(force[0], force[1], a.texture, a.size, scale=a.scale, phase=a.phase)
        if rng.random() < 0.5:
            a, b = b, a
    relation = _pick(rng, RELATIONS)
    (x0, y0), (x1, y1) = _place_two(rng, relation)
    objs = (
        ObjectSpec(a.colour, a.shape, a.texture, a.size, x0, y0, a.scale, a.phase),
        ObjectSpec(b.colour, b.shape, b.texture, b.size, x1, y1, b.scale, b.phase),
    )
    return Scene(objs, category, relation)


def distinguishable(scene: Scene) -> bool:
    """Two-object captions must tell the objects apart by what the category mentions."""
    if len(scene.objects) < 2:
        return True
    a, b = scene.objects
    if scene.category == "colour":
        return a.colour != b.colour
    if scene.category == "shape":
        return a.shape != b.shape
    if scene.category == "texture":
        return a.texture != b.texture
    if scene.category == "size":
        return a.size != b.size and (a.colour, a.shape) != (b.colour, b.shape)
    return (a.colour, a.shape) != (b.colour, b.shape)


def sample_scene(
    rng: np.random.Generator,
    category: str,
    holdout: Holdout | None = None,
    only_holdout: bool = False,
    max_tries: int = 10_000,
) -> Scene:
    """Draw a random scene for a caption category.

    ``holdout`` with ``only_holdout=False`` excludes every scene showing a held-out composition (prior
    training data); ``only_holdout=True`` instead returns only scenes that show one (held-out evaluation).
    """
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; choose from {', '.join(CATEGORIES)}")
    bindings = sorted(holdout.bindings) if holdout is not None else []
    for _ in range(max_tries):
        force = None
        if only_holdout and bindings and (not holdout.relations or rng.random() < 0.7):
            force = bindings[int(rng.integers(len(bindings)))]
        scene = _draw_candidate(rng, category, force)
        if not distinguishable(scene):
            continue
        if holdout is None:
            return scene
        if holdout.scene_is_held_out(scene) == only_holdout:
            return scene
    raise ValueError(f"no {category} scene satisfies the holdout constraints after {max_tries} tries")


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices (pixels) of a shape of radius r centred at (cx, cy)."""
    if shape == "square":
        h = r * 0.86
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        angles = [-90.0, 30.0, 150.0]
        rr = r * 1.12
        return [(cx + rr * math.cos(math.radians(a)), cy + 0.15 * r + rr * math.sin(math.radians(a)))
                for a in angles]
    if shape == "hexagon":
        return [(cx + r * math.cos(math.radians(60 * k)), cy + r * math.sin(math.radians(60 * k)))
                for k in range(6)]
    if shape == "star":
        pts = []
        for k in range(10):
            rr = r * 1.12 if k % 2 == 0 else r * 0.47
            a = math.radians(-90 + 36 * k)
            pts.append((cx + rr * math.cos(a), cy + 0.08 * r + rr * math.sin(a)))
        return pts
    if shape == "heart":
        pts = []
        for k in range(60):
            t = 2 * math.pi * k / 60
            hx = 16 * math.sin(t) ** 3
            hy = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + r * hx / 15.5, cy - r * (hy + 2.5) / 15.5))
        return pts
    raise ValueError(f"unknown shape {shape!r}")


def pattern_colour(colour: str) -> tuple[int, int, int]:
    """The contrasting colour used for stripes and dots of a textured object."""
    rgb = np.array(COLOURS[colour], dtype=np.float64)
    lum = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) / 255.0
    target = 0.0 if lum > 0.45 else 255.0
    mixed = rgb + 0.6 * (target - rgb) if colour != "black" else np.array([205.0, 205.0, 205.0])
    return tuple(int(round(v)) for v in mixed)  # type: ignore[return-value]


def _texture_layer(obj: ObjectSpec, side: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """RGB fill of the object's box at (x0, y0, w, h): solid colour, diagonal stripes or a dot grid."""
    layer = np.empty((h, w, 3), dtype=np.uint8)
    layer[:] = COLOURS[obj.colour]
    if obj.texture == "solid":
        return layer
    px = side / 64.0  # one 64x64 pixel in supersampled units
    yy, xx = np.mgrid[y0 : y0 + h, x0 : x0 + w].astype(np.float32)
    if obj.texture == "striped":
        period = 4.5 * px
        mask = ((xx + yy) / period + obj.phase) % 1.0 < 0.5
    else:
        period = 5.0 * px
        fx = ((xx - obj.x * side) / period + 0.5 + obj.phase) % 1.0 - 0.5
        fy = ((yy - obj.y * side) / period + 0.5) % 1.0 - 0.5
        mask = fx**2 + fy**2 < 0.24**2
    layer[mask] = pattern_colour(obj.colour)
    return layer


def _erode(mask: np.ndarray, k: int) -> np.ndarray:
    """Binary erosion by a (2k+1) square, separable (much cheaper than PIL's rank filter)."""
    out = mask.copy()
    for axis in (0, 1):
        src = out.copy()
        for d in range(1, k + 1):
            fwd = np.zeros_like(src)
            bwd = np.zeros_like(src)
            if axis == 0:
                fwd[:-d] = src[d:]
                bwd[d:] = src[:-d]
            else:
                fwd[:, :-d] = src[:, d:]
                bwd[:, d:] = src[:, :-d]
            out &= fwd & bwd
    return out


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Render a scene as an RGB image of ``size`` x ``size`` pixels; deterministic in the scene."""
    side = size * _SUPERSAMPLE
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    for obj in scene.objects:
        cx, cy, r = obj.x * side, obj.y * side, obj.radius * side
        x0, y0 = max(int(cx - 1.3 * r), 0), max(int(cy - 1.3 * r), 0)
        x1, y1 = min(int(cx + 1.3 * r) + 2, side), min(int(cy + 1.3 * r) + 2, side)
        w, h = x1 - x0, y1 - y0
        mask_img = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(mask_img)
        lx, ly = cx - x0, cy - y0
        if obj.shape == "circle":
            draw.ellipse([lx - r, ly - r, lx + r, ly + r], fill=255)
        else:
            draw.polygon(_shape_polygon(obj.shape, lx, ly, r), fill=255)
        mask = np.asarray(mask_img) > 127
        box = canvas[y0:y1, x0:x1]
        box[mask] = COLOURS[obj.colour]
        if obj.texture != "solid":
            # Texture only inside a solid rim about one output pixel wide, so the silhouette stays legible.
            inner = _erode(mask, _SUPERSAMPLE)
            box[inner] = _texture_layer(obj, side, x0, y0, w, h)[inner]
    img = Image.fromarray(canvas, "RGB")
    return img.resize((size, size), Image.Resampling.BOX)


def render_array(scene: Scene, size: int = 64) -> np.ndarray:
    """Render a scene to a uint8 (size, size, 3) array."""
    return np.asarray(render(scene, size), dtype=np.uint8)


def render_arrays(scenes: Sequence[Scene], size: int = 64, workers: int = 1) -> np.ndarray:
    """Render scenes to (N, size, size, 3) uint8, over ``workers`` processes when > 1 (same pixels either way).

    Rendering is pure Python/PIL at ~600 scenes/s per core: pools of 10^5 scenes for a GPU build need the cores.
    """
    if workers <= 1 or len(scenes) < 4 * workers:
        return _render_chunk((scenes, size))
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        chunks = pool.map(_render_chunk, [(scenes[i : i + 512], size) for i in range(0, len(scenes), 512)])
    return np.concatenate(chunks)


def _render_chunk(args: tuple[Sequence[Scene], int]) -> np.ndarray:
    scenes, size = args
    return np.stack([render_array(s, size) for s in scenes])


def scene_to_dict(scene: Scene) -> dict:
    """A JSON-ready dict of the scene (stored beside dataset images as ground truth)."""
    return {
        "category": scene.category,
        "relation": scene.relation,
        "objects": [
            {"colour": o.colour, "shape": o.shape, "texture": o.texture, "size": o.size,
             "x": o.x, "y": o.y, "scale": o.scale, "phase": o.phase}
            for o in scene.objects
        ],
    }


def scene_from_dict(data: dict) -> Scene:
    """Inverse of :func:`scene_to_dict`."""
    objs = tuple(ObjectSpec(**o) for o in data["objects"])
    return Scene(objs, data["category"], data.get("relation"))
