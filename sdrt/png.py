"""PNG files that carry their generation parameters, written atomically.

The parameters live in a tEXt chunk named `parameters` as one JSON object (prompt, negative_prompt,
steps, scheduler, guidance, seed, size, model, backend, ...): unambiguous to parse back, whatever the
prompt contains, so any image can be regenerated.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Union

import PIL.Image
import PIL.PngImagePlugin

from sdrt.checks import check_output_file
from sdrt.errors import InvalidInputError

PARAMETERS_KEY = "parameters"
_TMP_NAME_CHARS = 32  # of the final name kept in the temporary one, so that stays short whatever the name


def check_writable(path: Union[str, os.PathLike]) -> Path:
    """Refuse, before any work is done, an output PNG path that cannot be written."""
    return check_output_file(path, "output path", suffix=".png")


def save_png(image: PIL.Image.Image, path: Union[str, Path], parameters: Mapping[str, Any]) -> None:
    """Write `image` to `path` with `parameters`: to a temporary file beside it, then renamed over it,
    so a failure never leaves a half-written PNG."""
    path = Path(path)
    info = PIL.PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, json.dumps(dict(parameters), ensure_ascii=False))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:_TMP_NAME_CHARS]}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes the file private (0o600); an image is not
            image.save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise InvalidInputError(f"cannot write {str(path)!r}: {e.strerror or e}") from e
    except BaseException:
        _remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove(tmp) -> None:
    if tmp is not None and os.path.exists(tmp):
        os.unlink(tmp)


def read_parameters(path: Union[str, Path]) -> dict:
    """The `parameters` a PNG written by `save_png` carries."""
    with PIL.Image.open(path) as img:
        text = img.text.get(PARAMETERS_KEY) if hasattr(img, "text") else None
    if text is None:
        raise InvalidInputError(f"{path}: no '{PARAMETERS_KEY}' text chunk")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"{path}: the '{PARAMETERS_KEY}' chunk is not sdrt's JSON ({e})") from e
