"""A simple analyser of generated shape pictures: background color, object color, shape kind.

Background: the palette color nearest the median of the outer two-pixel ring. Object: pixels far from
the background color; its color is the palette color nearest their median; its kind comes from how much
of its bounding box it fills (square ~1.0, circle ~pi/4, triangle ~0.5).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from sdrt.tiny.shapes import COLORS

_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
_NAMES = list(COLORS)
OBJECT_DISTANCE = 90.0   # RGB distance from the background that counts as object
MIN_OBJECT_PIXELS = 40   # smaller blobs are noise, not a shape


@dataclass(frozen=True)
class Analysis:
    background: str
    color: Optional[str]       # None when no object was found
    shape: Optional[str]
    centroid: Optional[tuple]  # (x, y) in pixels
    fill: float


def nearest_color(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


def object_mask(image: np.ndarray) -> tuple[np.ndarray, str]:
    """image: uint8 [H, W, 3] -> (bool mask of the object, background color name)."""
    img = image.astype(np.float32)
    ring = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                           img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    background = nearest_color(np.median(ring, axis=0))
    distance = np.sqrt(((img - COLORS[background]) ** 2).sum(axis=-1))
    return distance > OBJECT_DISTANCE, background


def analyse(image: np.ndarray) -> Analysis:
    mask, background = object_mask(image)
    if mask.sum() < MIN_OBJECT_PIXELS:
        return Analysis(background, None, None, None, 0.0)
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = float(mask.sum() / box)
    shape = "square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle"
    color = nearest_color(np.median(image[mask].astype(np.float32), axis=0))
    return Analysis(background, color, shape, (float(xs.mean()), float(ys.mean())), fill)
