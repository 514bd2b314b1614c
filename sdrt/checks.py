"""Checks of generation arguments, shared by the Python API and the CLI.

Torch-free on purpose: the CLI runs them before importing torch and loading a model, so a bad argument
fails in a fraction of a second instead of after the load.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

from sdrt.errors import InvalidInputError

SIZE_MULTIPLE = 8
MIN_SIZE, MAX_SIZE = 8, 4096
OUTPUTS = ("pil", "np", "latent")


def _is_number(value: Any) -> bool:
    # numbers.Real admits numpy scalars too (np.float32(7.5), np.int64(3))
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_size(name: str, value: Any, multiple: int = SIZE_MULTIPLE) -> int:
    """A height or width: an int, a multiple of `multiple`, in [MIN_SIZE, MAX_SIZE]."""
    if not _is_integer(value) or not MIN_SIZE <= value <= MAX_SIZE or value % multiple:
        raise InvalidInputError(f"{name} must be a multiple of {multiple} in [{MIN_SIZE}, {MAX_SIZE}], got {value!r}")
    return int(value)


def check_positive_int(name: str, value: Any) -> int:
    if not _is_integer(value) or value < 1:
        raise InvalidInputError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_guidance(value: Any) -> float:
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise InvalidInputError(f"guidance_scale must be a finite number >= 0 (> 1 enables guidance), got {value!r}")
    return float(value)


def check_strength(value: Any) -> float:
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise InvalidInputError(f"strength must be a number in [0, 1], got {value!r}")
    return float(value)


# diffusers' defaults: StableDiffusionImg2ImgPipeline 0.8, StableDiffusionInpaintPipeline 1.0
DEFAULT_STRENGTH = {"img2img": 0.8, "inpaint": 1.0}


def strength_or_default(value: Any, inpainting: bool) -> float:
    """`strength` checked; None gives the mode's default (diffusers': img2img 0.8, inpainting 1.0)."""
    if value is None:
        return DEFAULT_STRENGTH["inpaint" if inpainting else "img2img"]
    return check_strength(value)


def check_output(value: Any) -> str:
    if value not in OUTPUTS:
        raise InvalidInputError(f"output must be one of {', '.join(OUTPUTS)}, got {value!r}")
    return value


PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_prediction_type(value: Any) -> Any:
    """None (take it from the model) or one of PREDICTION_TYPES."""
    if value is not None and value not in PREDICTION_TYPES:
        raise InvalidInputError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)} "
                                f"(or None: from the model), got {value!r}")
    return value
