"""Images over HTTP: base64 in (size-checked before decoding, Pillow's decompression-bomb guard on), PNG out."""
from __future__ import annotations

import base64
import binascii
import io
import warnings
from typing import Optional

import PIL.Image
import PIL.PngImagePlugin

from sdrt.serve.rejections import Rejected


def decode_base64_image(data: str, field: str, *, max_bytes: int, max_pixels: int) -> PIL.Image.Image:
    """A base64 (or `data:image/...;base64,`) string -> a loaded PIL image. Refused with 413 when the encoded
    data or the picture the header announces is over the limits, before any pixel is decoded."""
    if not isinstance(data, str) or not data:
        raise Rejected(field, "must be a base64-encoded image")
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if not header.endswith(";base64"):
            raise Rejected(field, "a data: URL must be base64-encoded (data:image/png;base64,...)")
    elif data.startswith(("http://", "https://", "file:")):
        raise Rejected(field, "must hold the image itself (base64); this server fetches no URLs")
    if len(data) * 3 // 4 > max_bytes:
        raise Rejected(field, f"the encoded image is over {max_bytes} bytes", status=413)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise Rejected(field, "is not valid base64") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(io.BytesIO(raw))
            width, height = image.size
            if width * height > max_pixels:
                raise Rejected(field, f"the image is {width}x{height}, over the server's {max_pixels} pixels",
                               status=413)
            image.load()
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning):
        raise Rejected(field, "the image is over Pillow's decompression-bomb limit", status=413) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise Rejected(field, f"is not a readable image ({e})") from None
    return image


def encode_png_base64(image: PIL.Image.Image, parameters: Optional[str] = None) -> str:
    """PNG bytes as base64 text; `parameters` goes into a `parameters` text chunk, as AUTOMATIC1111 writes."""
    info = None
    if parameters is not None:
        info = PIL.PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
