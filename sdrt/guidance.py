"""Classifier-free guidance: the one place where the unconditional and conditional predictions combine.

The CFG batch is laid out as diffusers lays it out: [uncond..., cond...] along dim 0. With
guidance_scale <= 1 there is no unconditional half at all (diffusers skips it too), so the UNet runs
on the conditional batch alone and the loop uses its output as is.
"""
from __future__ import annotations

import math
import numbers
from typing import Union

from torch import Tensor

from sdrt.errors import InvalidInputError


def uses_cfg(guidance_scale: float) -> bool:
    """Whether the unconditional batch is needed (guidance_scale > 1)."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real) \
            or not math.isfinite(guidance_scale):
        raise InvalidInputError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    return guidance_scale > 1


def combine(noise_pred: Tensor, guidance_scale: Union[float, Tensor]) -> Tensor:
    """uncond + g * (cond - uncond) over a [uncond..., cond...] batch. `guidance_scale` may be a 0-d device
    tensor (a CUDA graph's static input, so a new scale needs no recapture): same arithmetic as a float."""
    if noise_pred.shape[0] % 2:
        raise InvalidInputError(f"noise_pred must hold an [uncond, cond] batch of even size under CFG, "
                                f"got batch {noise_pred.shape[0]}")
    uncond, cond = noise_pred.chunk(2)
    return uncond + guidance_scale * (cond - uncond)
