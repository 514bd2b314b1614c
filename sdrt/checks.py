"""Checks of generation arguments and the limits on one generation, shared by the Python API and the CLI.

Torch-free on purpose: the CLI runs them before importing torch and loading a model, so a bad argument
fails in a fraction of a second instead of after the load.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from sdrt.errors import InvalidInputError

SIZE_MULTIPLE = 8
MIN_SIZE, MAX_SIZE = 8, 4096
OUTPUTS = ("pil", "np", "latent")
NAME_MAX = 255  # bytes in one file name on the usual file systems, when the folder cannot tell

# Limits.field -> the environment variable that sets it
LIMIT_VARIABLES = {"max_images": "SDRT_MAX_IMAGES", "max_steps": "SDRT_MAX_STEPS", "max_pixels": "SDRT_MAX_PIXELS"}


@dataclass(frozen=True)
class Limits:
    """Upper bounds on one generation call, enforced before any work by the API and the CLI alike.

    A service lowers them to bound what one request may cost. `Limits.from_env()` (the default of
    `sdrt.load` and of the CLI) reads them from SDRT_MAX_IMAGES, SDRT_MAX_STEPS and SDRT_MAX_PIXELS.
    """

    max_images: int = 64               # images per call: prompts x num_images
    max_steps: int = 500               # denoising steps; every scheduler but LCM (at most 50) runs this many
    max_pixels: int = MAX_SIZE ** 2    # height x width of one image (each side is also at most MAX_SIZE)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _is_integer(value) or value < 1:
                raise InvalidInputError(f"Limits.{f.name} must be an integer >= 1, got {value!r}")

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "Limits":
        """The defaults, each replaced by its environment variable where that is set."""
        environ = os.environ if environ is None else environ
        values = {}
        for name, variable in LIMIT_VARIABLES.items():
            text = environ.get(variable, "").strip()
            if not text:
                continue
            try:
                value = int(text)
            except ValueError:
                value = 0
            if value < 1:
                raise InvalidInputError(f"environment variable {variable} must be an integer >= 1, got {text!r}")
            values[name] = value
        return cls(**values)


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


def check_pixels(height: int, width: int, limits: Limits, what: str = "height x width") -> None:
    if height * width > limits.max_pixels:
        raise InvalidInputError(f"{what} = {width}x{height} = {width * height} pixels is more than max_pixels="
                                f"{limits.max_pixels} ({_raise_hint('max_pixels')})")


def check_steps(value: Any, limits: Limits, name: str = "steps") -> int:
    if not _is_integer(value) or not 1 <= value <= limits.max_steps:
        raise InvalidInputError(f"{name} must be an integer in [1, {limits.max_steps}] "
                                f"({_raise_hint('max_steps')}), got {value!r}")
    return int(value)


def check_image_count(count: int, limits: Limits, what: str = "num_images") -> int:
    """`count` images in one call (what: how the caller asked for them, e.g. "num_images=4 x 2 prompts")."""
    if count > limits.max_images:
        raise InvalidInputError(f"{what} asks for {count} images in one call, more than max_images="
                                f"{limits.max_images} ({_raise_hint('max_images')})")
    return count


def _raise_hint(field: str) -> str:
    return f"the limit: raise it with {LIMIT_VARIABLES[field]} or sdrt.load(limits=sdrt.Limits({field}=...))"


def check_text(name: str, value: str) -> str:
    """A prompt: text that UTF-8 can encode. Command-line bytes that are not UTF-8 reach Python as lone
    surrogates (U+DC80-U+DCFF), as does such a character written into a Python string."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(value[e.start])
        what = (f"the byte 0x{code - 0xDC00:02x}, which is not UTF-8" if 0xDC80 <= code <= 0xDCFF
                else f"the lone surrogate U+{code:04X}")
        raise InvalidInputError(f"{name} must be valid UTF-8 text: character {e.start} is {what}") from None
    return value


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
def check_file_name(path: Union[str, os.PathLike], name: str = "output path", suffix: Optional[str] = None) -> Path:
    """The form of an output file's path: a file name (not a folder's path ending in a separator) of at most
    NAME_MAX bytes, with `suffix` when given."""
    text = os.fspath(path)
    if not isinstance(text, str):
        raise InvalidInputError(f"{name} must be a str or os.PathLike path, got {text!r}")
    if text.endswith(tuple(s for s in (os.sep, os.altsep) if s)):
        raise InvalidInputError(f"{name} {text!r} ends in a path separator; give a file name")
    result = Path(text)
    if suffix is not None and result.suffix.lower() != suffix:
        raise InvalidInputError(f"{name} must end in {suffix}, got {text!r}")
    limit = _name_max(result.parent)
    if len(os.fsencode(result.name)) > limit:
        raise InvalidInputError(f"{name} {text!r}: the file name is {len(os.fsencode(result.name))} bytes long, "
                                f"more than the {limit} the file system allows")
    return result


def check_output_file(path: Union[str, os.PathLike], name: str = "output path", suffix: Optional[str] = None,
                      make_parents: bool = False) -> Path:
    """Refuse, before any work is done, an output file that cannot be written. make_parents: missing folders
    will be created, so the nearest existing one must be writable."""
    result = check_file_name(path, name, suffix)
    text = os.fspath(path)
    try:
        folder = result.parent
        if make_parents:
            while not folder.exists() and folder != folder.parent:
                folder = folder.parent
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "does not exist"
            raise InvalidInputError(f"{name} {text!r}: folder {str(folder)!r} {what}")
        if result.is_dir():
            raise InvalidInputError(f"{name} {text!r} is a folder")
        if not os.access(folder, os.W_OK) or (result.exists() and not os.access(result, os.W_OK)):
            raise InvalidInputError(f"{name} {text!r} is not writable")
    except OSError as e:  # a path too long, a loop of links, ...
        raise InvalidInputError(f"{name} {text!r}: {e.strerror or e}") from None
    return result


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # a missing folder; a platform without pathconf
        return NAME_MAX
