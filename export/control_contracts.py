"""Export contracts for ControlNet (SD 1.x/2.x):

    controlnet      sample [B, 4, h, w], timestep [B], encoder_hidden_states [B, 77*k, D], controlnet_cond
                    [B, 3, H, W] in [0, 1] -> down_residual_0..n-1 (one per U-Net skip), mid_residual: the zero
                    convs' outputs, unscaled (scale, guess mode's ramp and pooling are applied outside the graph,
                    by `sdrt.models.controlnet.scale_residuals`, so one graph serves every scale)
    unet_control    the U-Net's inputs plus down_residual_0..n-1 and mid_residual -> noise_pred

A pipeline with ControlNets runs the U-Net as `unet_control` at every step (zero residuals when no ControlNet
is active: adding 0 changes nothing), so LoRA weights reach the one U-Net graph it uses.
"""
from __future__ import annotations

import torch
from torch import nn

from sdrt.components import Components
from sdrt.config import UNetConfig
from sdrt.export.contracts import TEXT_LENGTH, ExportContract, contracts_for
from sdrt.models.controlnet import ControlNet, skip_shapes

CONTROL_COMPONENTS = ("controlnet", "unet_control")


def residual_names(ucfg: UNetConfig, batch: int = 1) -> tuple[str, ...]:
    return tuple(f"down_residual_{j}" for j in range(len(skip_shapes(ucfg, batch, 1, 1)))) + ("mid_residual",)


def residual_shapes(ucfg: UNetConfig, batch: int, h: int, w: int) -> dict[str, tuple[int, ...]]:
    """name -> shape of every residual for latents [batch, *, h, w]."""
    down = skip_shapes(ucfg, batch, h, w)
    names = residual_names(ucfg)
    return {**dict(zip(names, down)), names[-1]: (batch, ucfg.block_out_channels[-1], *down[-1][2:])}


def _residual_axes(ucfg: UNetConfig) -> dict[str, dict[int, str]]:
    """Each residual's batch and (per resolution level) spatial axes."""
    axes, level, sides = {}, 0, None
    for name, shape in residual_shapes(ucfg, 1, 64, 64).items():
        if sides is not None and shape[2] != sides:
            level += 1
        sides = shape[2]
        axes[name] = {0: "batch", 2: f"height_{level}", 3: f"width_{level}"}
    return axes


class _UnscaledControlNet(nn.Module):
    def __init__(self, net: ControlNet):
        super().__init__()
        self.net = net

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond) -> tuple[torch.Tensor, ...]:
        down, mid = self.net.unscaled(sample, timestep, encoder_hidden_states, controlnet_cond)
        return (*down, mid)


class _ResidualUNet(nn.Module):
    def __init__(self, unet: nn.Module, n_down: int):
        super().__init__()
        self.unet, self.n_down = unet, n_down

    def forward(self, sample, timestep, encoder_hidden_states, *residuals) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, down_residuals=list(residuals[:self.n_down]),
                         mid_residual=residuals[self.n_down])


def controlnet_contract(net: ControlNet, vae_scale: int) -> ExportContract:
    ucfg = net.config.unet
    names = residual_names(ucfg)

    def inputs(b, h, w, n=TEXT_LENGTH):
        return {"sample": (b, ucfg.in_channels, h // vae_scale, w // vae_scale), "timestep": (b,),
                "encoder_hidden_states": (b, n, ucfg.cross_attention_dim),
                "controlnet_cond": (b, net.config.conditioning_channels, h, w)}

    bhw = {0: "batch", 2: "height", 3: "width"}
    return ExportContract(
        "controlnet", tuple(inputs(1, 1, 1)), names,
        {"sample": bhw, "timestep": {0: "batch"}, "encoder_hidden_states": {0: "batch", 1: "text_length"},
         "controlnet_cond": {0: "batch", 2: "image_height", 3: "image_width"}, **_residual_axes(ucfg)},
        lambda c: _UnscaledControlNet(net), inputs,
        lambda s: residual_shapes(ucfg, s["sample"][0], *s["sample"][2:]),
        {"timestep": torch.float32})


def unet_control_contract(components: Components) -> ExportContract:
    base = contracts_for(components)["unet"]
    ucfg = components.unet.config
    names = residual_names(ucfg)
    scale = components.vae.config.downsample_factor

    def inputs(b, h, w, n=TEXT_LENGTH):
        return {**base.input_shapes(b, h, w, n), **residual_shapes(ucfg, b, h // scale, w // scale)}

    return ExportContract(
        "unet_control", base.input_names + names, base.output_names, {**base.dynamic_axes, **_residual_axes(ucfg)},
        lambda c: _ResidualUNet(c.unet, len(names) - 1), inputs, base.output_shapes, base.fixed_input_dtypes)
