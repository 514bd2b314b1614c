"""Synthetic captioned images: one flat-colored shape on a plain background of another color.

"a red circle on a blue background", 64x64, shapes at varied positions and sizes. Rendered with 4x
supersampling so edges are anti-aliased the same way every time.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220),
          "yellow": (240, 220, 40), "white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")
IMAGE_SIZE = 64
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    cx: float      # centre, in pixels
    cy: float
    radius: float  # half the shape's width

    @property
    def caption(self) -> str:
        return caption(self.shape, self.color, self.background)


def caption(shape: str, color: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def random_scene(rng: np.random.Generator, size: int = IMAGE_SIZE) -> Scene:
    names = list(COLORS)
    color, background = rng.choice(len(names), size=2, replace=False)
    radius = rng.uniform(0.16, 0.3) * size
    margin = radius + 2
    return Scene(shape=SHAPES[rng.integers(len(SHAPES))], color=names[color], background=names[background],
                 cx=rng.uniform(margin, size - margin), cy=rng.uniform(margin, size - margin), radius=radius)


def shape_mask(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """Coverage of the shape in [0, 1], [size, size] float32."""
    n = size * _SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) / _SUPERSAMPLE
    y, x = np.meshgrid(coords, coords, indexing="ij")
    dx, dy, r = x - scene.cx, y - scene.cy, scene.radius
    if scene.shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif scene.shape == "square":
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    else:  # upward triangle, as wide as it is tall
        inside = (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    return inside.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3)).astype(np.float32)


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 [size, size, 3]."""
    cover = shape_mask(scene, size)[..., None]
    fg, bg = np.array(COLORS[scene.color], np.float32), np.array(COLORS[scene.background], np.float32)
    return np.round(cover * fg + (1 - cover) * bg).astype(np.uint8)


def batch(rng: np.random.Generator, n: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[str]]:
    """n images as float32 [n, 3, size, size] in [-1, 1], and their captions."""
    scenes = [random_scene(rng, size) for _ in range(n)]
    images = np.stack([render(s, size) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return images.transpose(0, 3, 1, 2), [s.caption for s in scenes]
