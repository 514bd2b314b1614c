"""What a server serves and the limits it enforces on every request."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from sdrt.serve.loras import LoraLibrary


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 1024 * 1024         # width x height of a generated image
    max_steps: int = 150
    max_images: int = 16                  # per request (A1111: batch_size x n_iter; OpenAI: n)
    max_body_bytes: int = 32 * 2**20      # a request body (base64 images included)
    max_input_pixels: int = 4096 * 4096   # an input image or mask, read from its header before decoding


@dataclass(frozen=True)
class ServedModel:
    name: str                             # what requests call it (A1111 sd_model_checkpoint, OpenAI model)
    native_size: tuple[int, int]          # (height, width): the default size
    inpainting: bool                      # a 9-channel inpainting U-Net: only img2img with a mask
    size_multiple: int = 8
    loras: LoraLibrary = field(default_factory=lambda: LoraLibrary(None, available=False))


@dataclass(frozen=True)
class ServeSettings:
    model: ServedModel
    limits: Limits = Limits()
    timeout_s: Optional[float] = 300.0    # per request, queueing included; None: no limit
    api_key: Optional[str] = None         # when set, every endpoint but /health needs "Bearer <key>"
