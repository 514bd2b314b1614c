"""Control-image preprocessors by name: a picture -> the control image a ControlNet was trained on.

`canny[:LOW:HIGH]`: OpenCV's Canny edge detector (thresholds default 100 and 200, as the ControlNet releases'
and diffusers' examples use them) on the RGB picture, the 0/255 edge map repeated to three channels. Needs
OpenCV: `pip install "sdrt[control]"` (opencv-python-headless).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import PIL.Image

from sdrt.errors import BackendUnavailableError, InvalidInputError

CANNY_THRESHOLDS = (100, 200)


def _cv2() -> Any:
    try:
        import cv2
    except ImportError:
        raise BackendUnavailableError("the canny preprocessor needs OpenCV: pip install \"sdrt[control]\" "
                                      "(opencv-python-headless)") from None
    return cv2


def _rgb_uint8(image: Any) -> np.ndarray:
    """Any image form `sdrt.images` reads -> HxWx3 uint8 RGB."""
    from sdrt import images as imgs  # torch: imported on first use, so name checks (the CLI's) stay light
    tensor = imgs.image_to_tensor(image)[0]  # [3, H, W] in [0, 1]
    return (tensor.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def canny(image: Any, low: int = CANNY_THRESHOLDS[0], high: int = CANNY_THRESHOLDS[1]) -> PIL.Image.Image:
    """Edges of `image` (white on black, RGB) by cv2.Canny(image, low, high)."""
    edges = _cv2().Canny(_rgb_uint8(image), low, high)  # [H, W] uint8 of 0/255
    return PIL.Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


PREPROCESSORS: dict[str, tuple[Callable[..., PIL.Image.Image], int]] = {"canny": (canny, 2)}  # name -> (fn, #params)


def check_preprocessor(spec: str) -> tuple[str, tuple[int, ...]]:
    """'canny' or 'canny:LOW:HIGH' -> (name, integer parameters); InvalidInputError naming the choices."""
    if not isinstance(spec, str):
        raise InvalidInputError(f"control_preprocess must be a preprocessor name ({', '.join(PREPROCESSORS)}), "
                                f"got {spec!r:.80}")
    name, *params = spec.split(":")
    if name not in PREPROCESSORS:
        raise InvalidInputError(f"unknown control preprocessor {name!r:.80}; choose one of {', '.join(PREPROCESSORS)}")
    wanted = PREPROCESSORS[name][1]
    if params and (len(params) != wanted or not all(p.isdigit() for p in params)):
        raise InvalidInputError(f"control preprocessor {spec!r:.80}: give {name} or {name}"
                                f"{':N' * wanted} with {wanted} non-negative integers")
    values = tuple(int(p) for p in params)
    if name == "canny" and values and not 0 <= values[0] <= values[1]:
        raise InvalidInputError(f"control preprocessor {spec!r:.80}: canny needs LOW <= HIGH")
    return name, values


def preprocess(spec: str, image: Any) -> PIL.Image.Image:
    """Run the preprocessor `spec` ('canny' or 'canny:LOW:HIGH') on `image` -> the control image."""
    name, params = check_preprocessor(spec)
    return PREPROCESSORS[name][0](image, *params)
