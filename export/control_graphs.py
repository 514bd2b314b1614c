"""ControlNet and the residual-taking U-Net around exported graphs (`sdrt.export.control_contracts`), with the
torch modules' call semantics. A runner is any callable taking the contract's inputs as keyword tensors and
returning its outputs as a list (see `sdrt.export.graph_components`)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from sdrt.export.control_contracts import residual_names, residual_shapes
from sdrt.export.graph_components import GraphUNet, Runner
from sdrt.models.controlnet import scale_residuals


def _timesteps(timestep: Union[torch.Tensor, float, int], sample: torch.Tensor) -> torch.Tensor:
    """The graphs take one float32 timestep per batch item."""
    t = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device).reshape(-1)
    return t.expand(sample.shape[0])


class GraphControlNet:
    """`ControlNet.__call__` on a `controlnet` graph: the graph's unscaled residuals, then `scale_residuals`."""

    def __init__(self, runner: Runner, config, module: Optional[torch.nn.Module] = None):
        self.runner, self.config, self.module = runner, config, module

    def __call__(self, sample: torch.Tensor, timestep, context: torch.Tensor, control: torch.Tensor,
                 scale: float = 1.0, guess_mode: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
        *down, mid = self.runner(sample=sample, timestep=_timesteps(timestep, sample), encoder_hidden_states=context,
                                 controlnet_cond=control.to(sample.dtype))
        return scale_residuals(self.config, down, mid, scale, guess_mode)


class GraphResidualUNet(GraphUNet):
    """`UNet.__call__` on an `unet_control` graph: residuals default to zeros (no ControlNet active this step)."""

    def __call__(self, sample: torch.Tensor, timestep, context: torch.Tensor,
                 down_residuals: Optional[Sequence[torch.Tensor]] = None, mid_residual: Optional[torch.Tensor] = None,
                 **added: torch.Tensor) -> torch.Tensor:
        names = residual_names(self.config)
        if down_residuals is None:
            shapes = residual_shapes(self.config, sample.shape[0], *sample.shape[2:])
            residuals = {n: sample.new_zeros(shapes[n]) for n in names}
        else:
            residuals = dict(zip(names, [*down_residuals, mid_residual], strict=True))
        return self.runner(sample=sample, timestep=_timesteps(timestep, sample), encoder_hidden_states=context,
                           **residuals, **added)[0]
