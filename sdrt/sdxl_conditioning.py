"""SDXL's micro-conditioning: the size/crop (or aesthetic-score) time ids. The pipeline passes them with the
pooled text embeds to the denoising loop as the U-Net's added inputs (`sdrt.denoise.denoise(added=...)`):
tensors, so a CUDA-graphed loop takes new ids and prompts without a recapture.

Defaults and rules are diffusers' StableDiffusionXL{,Img2Img,Inpaint}Pipeline's: original_size and target_size
default to the output size, crops to (0, 0); text-to-image uses the negative sizes only when both are given
(else the negative ids are the positive ones), the image modes always build the negative ids from their
negative arguments (each defaulting to the positive one); the refiner (requires_aesthetics_score) replaces
target_size with aesthetic_score (6.0) and negative_aesthetic_score (2.5).
One deliberate difference: for a batch under CFG diffusers repeats the [negative; positive] id pair
(`.repeat(batch, 1)`), interleaving it against its [uncond x B; cond x B] context, so when the negative ids
differ, its images past the first get mixed ids; sdrt batches the ids as it batches the context.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from sdrt.errors import InvalidInputError


@dataclass(frozen=True)
class SDXLOptions:
    """The SDXL-only arguments of one pipeline call (sizes as (height, width), crops as (top, left))."""

    original_size: Optional[tuple] = None
    crops_coords_top_left: tuple = (0, 0)
    target_size: Optional[tuple] = None
    negative_original_size: Optional[tuple] = None
    negative_crops_coords_top_left: tuple = (0, 0)
    negative_target_size: Optional[tuple] = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    pooled_prompt_embeds: Optional[Tensor] = None
    negative_pooled_prompt_embeds: Optional[Tensor] = None
    denoising_start: Optional[float] = None  # the handoff: see sdrt.sdxl_handoff
    denoising_end: Optional[float] = None


def check_pair(name: str, value: Any, *, positive: bool) -> Optional[tuple]:
    """None, or two integers (> 0 for sizes, >= 0 for crops) as a tuple."""
    if value is None:
        return None
    low = 1 if positive else 0
    if not (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in value)):
        raise InvalidInputError(f"{name} must be two integers >= {low} ({'height, width' if positive else 'top, left'})"
                                f", got {value!r:.80}")
    return tuple(value)


def check_score(name: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not torch.isfinite(torch.tensor(float(value))):
        raise InvalidInputError(f"{name} must be a finite number, got {value!r:.80}")
    return float(value)


def time_ids(options: SDXLOptions, size: tuple, aesthetic: bool, image_mode: bool) -> tuple[list, list]:
    """-> (positive ids, negative ids) for an output of `size` (height, width)."""
    original = options.original_size or size
    target = options.target_size or size
    crops, neg_crops = options.crops_coords_top_left, options.negative_crops_coords_top_left
    if aesthetic:
        neg_original = options.negative_original_size or original
        return ([*original, *crops, options.aesthetic_score],
                [*neg_original, *neg_crops, options.negative_aesthetic_score])
    positive = [*original, *crops, *target]
    if image_mode:
        return positive, [*(options.negative_original_size or original), *neg_crops,
                          *(options.negative_target_size or target)]
    if options.negative_original_size is not None and options.negative_target_size is not None:
        return positive, [*options.negative_original_size, *neg_crops, *options.negative_target_size]
    return positive, positive


def batched(rows: Sequence[Tensor], num_images: int) -> Tensor:
    """[uncond; cond] (or [cond]) per-prompt rows -> each repeated num_images times, concatenated."""
    return torch.cat([r.repeat_interleave(num_images, dim=0) for r in rows])
