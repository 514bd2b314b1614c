"""Classifier-free guidance: the one place where the unconditional and conditional predictions combine.

The CFG batch is laid out as diffusers lays it out: [uncond..., cond...] along dim 0. With
guidance_scale <= 1 there is no unconditional half at all (diffusers skips it too), so the UNet runs
on the conditional batch alone and the loop uses its output as is.

A batch may carry one scale per sample (a list, applied as a [B, 1, 1, 1] tensor): every sample's
arithmetic is then the same as in a call of its own. Such a list is all guided (> 1) or all unguided.
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence, Union

import torch
from torch import Tensor

from sdrt.errors import InvalidInputError


def uses_cfg(guidance_scale: Union[float, Sequence[float]]) -> bool:
    """Whether the unconditional batch is needed (guidance_scale > 1; for a per-sample list, every scale)."""
    if isinstance(guidance_scale, (list, tuple)):
        guided = {uses_cfg(g) for g in guidance_scale}
        if len(guided) != 1:
            raise InvalidInputError(f"a guidance_scale list must be all > 1 (guided) or all <= 1 (unguided), "
                                    f"got {list(guidance_scale)!r}")
        return guided.pop()
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real) \
            or not math.isfinite(guidance_scale):
        raise InvalidInputError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    return guidance_scale > 1


def per_sample_scale(scales: Sequence[float], device: Union[str, torch.device]) -> Tensor:
    """One guidance scale per sample as a float32 [B, 1, 1, 1] tensor for `combine`."""
    return torch.tensor([float(g) for g in scales], dtype=torch.float32, device=device).view(-1, 1, 1, 1)


def combine(noise_pred: Tensor, guidance_scale: Union[float, Tensor]) -> Tensor:
    """uncond + g * (cond - uncond) over a [uncond..., cond...] batch. `guidance_scale` may be a 0-d device
    tensor (a CUDA graph's static input, so a new scale needs no recapture) or a [B, 1, 1, 1] one (a scale
    per sample, `per_sample_scale`): same arithmetic as a float."""
    if noise_pred.shape[0] % 2:
        raise InvalidInputError(f"noise_pred must hold an [uncond, cond] batch of even size under CFG, "
                                f"got batch {noise_pred.shape[0]}")
    uncond, cond = noise_pred.chunk(2)
    return uncond + guidance_scale * (cond - uncond)
