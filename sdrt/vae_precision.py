"""The VAE in float32 when float16 is not enough: SDXL's VAE overflows fp16 (inf/NaN, black images).

For a torch-module VAE (the torch backend) in float16 or bfloat16:
- an overflowing decode (inf/NaN in its output) is redone in float32, with a warning; the check is one
  reduction and one host sync per decode, after the loop (SD 1.x and 2.x too: their VAE can overflow as well);
- `force_upcast` (the VAE config's flag, default true as diffusers'; SDXL pipelines honour it as diffusers'
  do, SD 1.x/2.x pipelines ignore it as diffusers' do): float16 decodes run in float32 from the start, and
  encodes in float32 whatever the low precision (diffusers' rules: bfloat16 has float32's range, so its
  decodes stay bfloat16). The fp16-fix VAE's config sets it false: its fp16 decode does not overflow.
The float32 VAE is a copy made on first need and kept (diffusers casts its VAE back and forth in place,
which concurrent calls could not share). Other backends' VAEs handle their precision themselves (the
triton backend reruns an overflowing decode in float32 the same way).
"""
from __future__ import annotations

import copy
import logging
import threading
from typing import Optional

import torch

log = logging.getLogger(__name__)


class VAEPrecision:
    """Decode / encode through `vae` (loaded in `dtype`), in float32 where the rules above say."""

    def __init__(self, vae, dtype: torch.dtype, force_upcast: bool):
        self.vae, self.dtype = vae, dtype
        self.upcasts = isinstance(vae, torch.nn.Module) and dtype != torch.float32
        self.upcast_decode = self.upcasts and force_upcast and dtype == torch.float16
        self.upcast_encode = self.upcasts and force_upcast
        self.fallbacks = 0  # decodes that overflowed and were redone in float32
        self._fp32: Optional[torch.nn.Module] = None
        self._lock = threading.Lock()

    def fp32(self) -> torch.nn.Module:
        """The float32 copy of the VAE (made on the first call)."""
        with self._lock:
            if self._fp32 is None:
                self._fp32 = copy.deepcopy(self.vae).float()
            return self._fp32

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents already divided by the scaling factor -> images in about [-1, 1] (float32 when upcast)."""
        if self.upcast_decode:
            return self.fp32().decode(latents.float())
        images = self.vae.decode(latents.to(self.dtype))
        if not self.upcasts or torch.isfinite(images).all():
            return images
        self.fallbacks += 1
        log.warning("the %s VAE decode overflowed (inf/NaN); decoding again in float32",
                    str(self.dtype).removeprefix("torch."))
        return self.fp32().decode(latents.float())

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels in [-1, 1] -> (mean, logvar), unscaled."""
        if self.upcast_encode:
            return self.fp32().encode(pixels.float())
        return self.vae.encode(pixels.to(self.dtype))
