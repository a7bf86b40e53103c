"""Deterministic synthetic scenes: coloured shapes over crops of real photos.

Each scene is a pure function of ``(seed, index, size)``: its random generator is seeded from
``(seed, index)`` alone, so any subset of images can be rendered in any order, by any number
of workers, and still come out identical. Rendering touches no files besides the bundled
background photos, which are decoded once per process.

Shapes are drawn bottom to top, so later shapes occlude earlier ones. A shape whose visible
area would be tiny is not drawn at all, rather than drawn and left unannotated: that keeps the
image, the instance masks and the semantic mask exactly consistent with one another.
"""

from __future__ import annotations

import colorsys
import functools
import math
from dataclasses import dataclass
from importlib import resources

import numpy as np
from PIL import Image, ImageDraw

# Class index i + 1 is CLASS_NAMES[i]; index 0 is the background in semantic masks.
CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "ring")
# Instances with fewer visible pixels than this are dropped: a few stray pixels of a shape are
# not a recognisable object, and they would only add noise to the detection metrics.
MIN_VISIBLE_AREA = 20
# Below this side length the smallest shapes cannot reliably exceed MIN_VISIBLE_AREA.
MIN_IMAGE_SIZE = 32
MAX_SHAPES = 4
# Shape radius as a fraction of the image side: small enough that several shapes fit,
# large enough that a triangle or star keeps its outline at 32 px.
RADIUS_RANGE = (0.15, 0.32)
# The square side of a background crop as a fraction of the photo's short side; small crops
# zoom in, so the same few photos yield many different-looking backgrounds.
CROP_SCALE_RANGE = (0.35, 1.0)
# Polygon classes: vertex count and the radius of every other vertex relative to the first;
# the star is a ten-vertex polygon whose odd vertices sit on an inner circle.
POLYGONS: dict[str, tuple[int, float]] = {
    "square": (4, 1.0),
    "triangle": (3, 1.0),
    "star": (10, 0.45),
    "hexagon": (6, 1.0),
}
BACKGROUND_PHOTOS: tuple[str, ...] = (
    "astronaut.jpg",
    "chelsea.jpg",
    "coffee.jpg",
    "hubble_deep_field.jpg",
    "rocket.jpg",
)


# eq=False: the fields hold arrays, for which a generated __eq__ would raise.
@dataclass(frozen=True, eq=False)
class ShapeInstance:
    """One visible shape in a scene.

    Attributes:
        category: Class index, 1-based (``CLASS_NAMES[category - 1]``).
        mask: ``(size, size)`` bool array of the pixels left visible after occlusion.
        box: ``(x0, y0, x1, y1)`` of the visible pixels; ``x1`` and ``y1`` are exclusive.
        area: Number of visible pixels.
    """

    category: int
    mask: np.ndarray
    box: tuple[int, int, int, int]
    area: int


@dataclass(frozen=True, eq=False)
class Scene:
    """One rendered image with its annotations.

    Attributes:
        image: ``(size, size, 3)`` uint8 RGB array.
        instances: The visible shapes, bottom (drawn first) to top.
        semantic: ``(size, size)`` uint8 array; 0 is background, ``c`` is class ``c``.
        label: Image-level class index (1-based): the class of the instance with the largest
            visible area; ties go to the instance drawn first.
    """

    image: np.ndarray
    instances: tuple[ShapeInstance, ...]
    semantic: np.ndarray
    label: int


def render_scene(seed: int, index: int, size: int) -> Scene:
    """Renders image ``index`` of the scene set identified by ``seed``.

    Args:
        seed: Seed of the whole scene set.
        index: Position of the image in the set; with ``seed`` it fully determines the scene.
        size: Side length of the square image in pixels, at least ``MIN_IMAGE_SIZE``.

    Returns:
        The scene, with at least one instance.

    Raises:
        ValueError: ``size`` is below ``MIN_IMAGE_SIZE``.
    """
    if size < MIN_IMAGE_SIZE:
        raise ValueError(f"scene size must be at least {MIN_IMAGE_SIZE} px, got {size}")
    rng = np.random.default_rng([seed, index])
    image = _background(rng, size)
    shapes = [_draw_shape(rng, size) for _ in range(rng.integers(1, MAX_SHAPES + 1))]

    # Visibility is decided top-down: a shape is hidden only by the shapes kept above it.
    kept: list[tuple[int, np.ndarray]] = []
    covered = np.zeros((size, size), dtype=bool)
    for category, mask in reversed(shapes):
        visible = mask & ~covered
        if np.count_nonzero(visible) >= MIN_VISIBLE_AREA:
            kept.append((category, visible))
            covered |= mask
    kept.reverse()

    semantic = np.zeros((size, size), dtype=np.uint8)
    instances = []
    for category, visible in kept:
        _paint(rng, image, visible)
        semantic[visible] = category
        instances.append(_instance(category, visible))
    # The topmost shape lies wholly in view, unoccluded, and RADIUS_RANGE makes even a small
    # star or triangle larger than MIN_VISIBLE_AREA, so there is always an instance.
    label = max(instances, key=lambda instance: instance.area).category
    return Scene(image=image, instances=tuple(instances), semantic=semantic, label=label)


@functools.cache
def _photos() -> tuple[Image.Image, ...]:
    # Decoded once per process; PIL can resize a sub-box of an image without copying it first.
    assets = resources.files("ladder_siam") / "assets"
    photos = []
    for name in BACKGROUND_PHOTOS:
        with (assets / name).open("rb") as stream, Image.open(stream) as photo:
            photos.append(photo.convert("RGB"))
    return tuple(photos)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    photos = _photos()
    photo = photos[rng.integers(len(photos))]
    width, height = photo.size
    side = rng.uniform(*CROP_SCALE_RANGE) * min(width, height)
    left = rng.uniform(0, width - side)
    top = rng.uniform(0, height - side)
    crop = photo.resize(
        (size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side)
    )
    pixels = np.array(crop)
    if rng.random() < 0.5:
        pixels = np.ascontiguousarray(pixels[:, ::-1])
    return pixels


def _draw_shape(rng: np.random.Generator, size: int) -> tuple[int, np.ndarray]:
    category = int(rng.integers(1, len(CLASS_NAMES) + 1))
    radius = rng.uniform(*RADIUS_RANGE) * size
    # Whole shapes only: then the topmost shape always shows its full area.
    cx, cy = rng.uniform(radius, size - radius, 2)
    angle = rng.uniform(0, 2 * math.pi)
    canvas = Image.new("1", (size, size))
    draw = ImageDraw.Draw(canvas)
    name = CLASS_NAMES[category - 1]
    if name in ("circle", "ring"):
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=1)
        if name == "ring":
            inner = radius * rng.uniform(0.45, 0.6)
            draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    else:
        draw.polygon(_polygon(name, cx, cy, radius, angle), fill=1)
    return category, np.asarray(canvas)


def _polygon(
    name: str, cx: float, cy: float, radius: float, angle: float
) -> list[tuple[float, float]]:
    vertices, inner_ratio = POLYGONS[name]
    points = []
    for step in range(vertices):
        r = radius * (inner_ratio if step % 2 else 1.0)
        theta = angle + 2 * math.pi * step / vertices
        points.append((cx + r * math.cos(theta), cy + r * math.sin(theta)))
    return points


def _paint(rng: np.random.Generator, image: np.ndarray, visible: np.ndarray) -> None:
    # Saturated, bright colours stand out from the photos; a linear shading gradient makes the
    # shapes look lit rather than flat, so a model cannot rely on perfectly uniform regions.
    hue, saturation, value = rng.uniform(0, 1), rng.uniform(0.55, 1), rng.uniform(0.55, 1)
    colour = np.array(colorsys.hsv_to_rgb(hue, saturation, value)) * 255
    direction = rng.uniform(0, 2 * math.pi)
    strength = rng.uniform(0, 0.3)
    ys, xs = np.nonzero(visible)
    ramp = np.cos(direction) * xs + np.sin(direction) * ys
    ramp = (ramp - ramp.mean()) / max(float(np.ptp(ramp)), 1.0)
    shaded = colour[None, :] * (1 + strength * ramp)[:, None]
    image[ys, xs] = np.clip(shaded, 0, 255).astype(np.uint8)


def _instance(category: int, visible: np.ndarray) -> ShapeInstance:
    rows = np.flatnonzero(visible.any(axis=1))
    cols = np.flatnonzero(visible.any(axis=0))
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    return ShapeInstance(
        category=category, mask=visible, box=box, area=int(np.count_nonzero(visible))
    )
