"""ControlNets on the `triton` backend: the modules on channels-last activations with the Triton kernels, as
`TritonUNet` runs the U-Net (whose down_residuals / mid_residual pass through to the module)."""
from __future__ import annotations

from typing import Union

import torch

from sdrt.models.controlnet import ControlNet
from sdrt.models.ops import use_kernels


class TritonControlNet:
    """`ControlNet.__call__` with the Triton kernels; the residuals stay channels-last (the U-Net's layout)."""

    def __init__(self, module: ControlNet, kernels):
        self.module, self.kernels, self.config = module.to(memory_format=torch.channels_last), kernels, module.config

    def __call__(self, sample: torch.Tensor, timestep: Union[torch.Tensor, float, int], context: torch.Tensor,
                 control: torch.Tensor, scale: float = 1.0, guess_mode: bool = False,
                 **added: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        # added: an SDXL ControlNet's text_embeds and time_ids
        with use_kernels(self.kernels):
            return self.module(sample.contiguous(memory_format=torch.channels_last), timestep, context,
                               control.contiguous(memory_format=torch.channels_last), scale, guess_mode, **added)
