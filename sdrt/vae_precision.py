"""The VAE in float32 when float16 is not enough: SDXL's VAE overflows fp16 (inf/NaN, black images).

For a torch-module VAE (the torch backend) running in float16/bfloat16:
- `force_upcast` (the VAE config's flag, honoured by SDXL pipelines as diffusers' are): every decode and
  encode runs in float32;
- otherwise a decode whose output holds inf/NaN is redone in float32, with a warning.
The float32 VAE is a copy made on first need and kept (diffusers casts its VAE back and forth in place, which
concurrent calls could not share). Other backends' VAEs handle overflow themselves (the triton backend reruns
in float32 too).
"""
from __future__ import annotations

import copy
import logging
import threading
from typing import Optional

import torch

log = logging.getLogger(__name__)


class VAEPrecision:
    """Decode / encode through `vae` (model dtype `dtype`), in float32 where the rules above say."""

    def __init__(self, vae, dtype: torch.dtype, force_upcast: bool):
        self.vae, self.dtype = vae, dtype
        self.upcasts = isinstance(vae, torch.nn.Module) and dtype != torch.float32
        self.force_upcast = self.upcasts and force_upcast
        self.fallbacks = 0  # decodes that overflowed and were redone in float32
        self._fp32: Optional[torch.nn.Module] = None
        self._lock = threading.Lock()

    def fp32(self) -> torch.nn.Module:
        with self._lock:
            if self._fp32 is None:
                self._fp32 = copy.deepcopy(self.vae).float()
            return self._fp32

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents already divided by the scaling factor -> images in about [-1, 1] (float32 when upcast)."""
        if self.force_upcast:
            return self.fp32().decode(latents.float())
        images = self.vae.decode(latents.to(self.dtype))
        if not self.upcasts or torch.isfinite(images).all():
            return images
        self.fallbacks += 1
        log.warning("the %s VAE decode overflowed (inf/NaN); decoding again in float32",
                    str(self.dtype).removeprefix("torch."))
        return self.fp32().decode(latents.float())

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.force_upcast:
            return self.fp32().encode(pixels.float())
        return self.vae.encode(pixels.to(self.dtype))
