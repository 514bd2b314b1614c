"""Classifier-free guidance: the one place where the unconditional and conditional predictions combine.

The CFG batch is laid out as diffusers lays it out: [uncond..., cond...] along dim 0. With
guidance_scale <= 1 there is no unconditional half at all (diffusers skips it too), so the UNet runs
on the conditional batch alone and `combine` passes its output through.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from sdrt.errors import InvalidInputError


def uses_cfg(guidance_scale: float) -> bool:
    """Whether the unconditional batch is needed (guidance_scale > 1)."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real) \
            or not math.isfinite(guidance_scale):
        raise InvalidInputError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    return guidance_scale > 1


def cfg_batch(sample: Tensor, guidance_scale: float) -> Tensor:
    """The UNet input batch: [x, x] under CFG (uncond half first), else x itself."""
    return torch.cat([sample, sample]) if uses_cfg(guidance_scale) else sample


def combine(noise_pred: Tensor, guidance_scale: float) -> Tensor:
    """uncond + g * (cond - uncond) over a [uncond..., cond...] batch; the batch as is when g <= 1."""
    if not uses_cfg(guidance_scale):
        return noise_pred
    if noise_pred.shape[0] % 2:
        raise InvalidInputError(f"noise_pred must hold an [uncond, cond] batch of even size under CFG, "
                                f"got batch {noise_pred.shape[0]}")
    uncond, cond = noise_pred.chunk(2)
    return uncond + guidance_scale * (cond - uncond)
