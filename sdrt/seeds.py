"""Seeds -> CPU generators -> noise, drawn exactly as diffusers draws it from `generator=`.

A single int seed makes one `torch.Generator("cpu")` for the whole batch: each draw is one randn of the
batch shape. A list of seeds makes one generator per image: each draw is one randn per image, row by row
(diffusers' `randn_tensor` with a list of generators). Noise is always drawn in float32 on the CPU, so a seed
gives the same start on every device; callers move it where it is needed.
"""
from __future__ import annotations

import numbers
import random
from typing import Optional, Sequence, Union

import torch

from sdrt.errors import InvalidInputError

SEED_LIMIT = 2**64  # torch.Generator.manual_seed accepts [0, 2**64)
SeedArg = Union[None, int, Sequence[int]]


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < SEED_LIMIT:
        raise InvalidInputError(f"seed must be an integer in [0, 2**64) or a list of them, got {seed!r}")
    return int(seed)  # numpy integers too


class NoiseSource:
    """The generators of one generation call and the seeds that made them (one per image)."""

    def __init__(self, seed: SeedArg, batch_size: int):
        if seed is None:
            seed = random.SystemRandom().randrange(2**32)
        if isinstance(seed, (list, tuple)):
            if len(seed) != batch_size:
                raise InvalidInputError(f"seed list must hold one seed per image ({batch_size}), got {len(seed)}")
            self.seeds = [_check_seed(s) for s in seed]
            self._generators = [torch.Generator("cpu").manual_seed(s) for s in self.seeds]
        else:
            self.seeds = [_check_seed(seed)] * batch_size
            self._generators = [torch.Generator("cpu").manual_seed(self.seeds[0])]

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        """A [B, ...] draw: one randn of the whole shape, or one [1, ...] randn per image's generator."""
        if len(self._generators) == 1:
            return torch.randn(tuple(shape), generator=self._generators[0], dtype=torch.float32)
        if shape[0] != len(self._generators):
            raise InvalidInputError(f"a batch of {shape[0]} needs as many seeds, got {len(self._generators)}")
        row = (1, *shape[1:])
        return torch.cat([torch.randn(row, generator=g, dtype=torch.float32) for g in self._generators])

    def randn_first(self, shape: Sequence[int]) -> torch.Tensor:
        """A draw from the first generator only (diffusers' inpainting encodes its single input image
        with `generator[0]` when given a list)."""
        return torch.randn(tuple(shape), generator=self._generators[0], dtype=torch.float32)

    def img2img_encode_noise(self, shape: Sequence[int]) -> torch.Tensor:
        """The VAE-sampling noise of img2img's one input image for a batch `shape`, as diffusers' img2img
        draws it: one generator encodes the image once ([1, ...]); a list encodes a copy per image."""
        return self.randn((1, *shape[1:])) if len(self._generators) == 1 else self.randn(shape)

    def step_noise(self, noise_steps: Sequence[bool], start: int, shape: Sequence[int]) -> list[Optional[torch.Tensor]]:
        """The scheduler noise of every step from `start` on, drawn up front in step order
        (None where the step takes none), so the denoising loop itself draws nothing."""
        return [self.randn(shape) if i >= start and needs else None for i, needs in enumerate(noise_steps)]
