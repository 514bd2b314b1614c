"""ControlNet for SD 1.x / 2.x (diffusers' ControlNetModel): a trainable copy of the U-Net's encoder that
turns a control image into residuals added to the U-Net's skips and mid block.

The encoder is the U-Net's own code (`sdrt.models.unet.DownBlock`, `MidBlock`, `encode`, `embed_timestep`),
built from the ControlNet's `UNetConfig`; what is ControlNet's alone is here: the control image's small
conv tower, and the zero-initialised 1x1 convs that read each skip out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from sdrt.config import UNetConfig
from sdrt.models.unet import DownBlock, MidBlock, TimestepEmbedding, added_embedding, embed_timestep, encode


@dataclass(frozen=True)
class ControlNetConfig:
    unet: UNetConfig                  # the encoder's architecture (its up-block fields are unused)
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple = (16, 32, 96, 256)
    global_pool_conditions: bool = False  # residuals averaged over space (the "shuffle" ControlNets)
    channel_order: str = "rgb"            # "bgr": the control image is flipped to BGR first

    @property
    def downsample_factor(self) -> int:
        """Control-image pixels per latent pixel: each level of the conditioning tower after the first halves."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)


class ConditioningEmbedding(nn.Module):
    """Control image [B, 3, H, W] in [0, 1] -> [B, C0, H/f, W/f]: conv, then pairs of (conv, strided conv)."""

    def __init__(self, out_channels: int, in_channels: int, channels: tuple):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        blocks = []
        for cin, cout in zip(channels[:-1], channels[1:]):
            blocks += [nn.Conv2d(cin, cin, 3, padding=1), nn.Conv2d(cin, cout, 3, padding=1, stride=2)]
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(channels[-1], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(x))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


class ControlNet(nn.Module):
    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.config = cfg
        ucfg = cfg.unet
        ch, heads, depths = ucfg.block_out_channels, ucfg.heads(), ucfg.transformer_depths()
        temb = 4 * ch[0]
        self.conv_in = nn.Conv2d(ucfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        # SDXL ControlNets: the U-Net's "text_time" embedding of the pooled text embeds and size/crop ids
        self.add_embedding = (TimestepEmbedding(ucfg.projection_class_embeddings_input_dim, temb)
                              if ucfg.addition_embed_type == "text_time" else None)
        self.controlnet_cond_embedding = ConditioningEmbedding(ch[0], cfg.conditioning_channels,
                                                               cfg.conditioning_embedding_out_channels)
        last = len(ch) - 1
        self.down_blocks = nn.ModuleList([
            DownBlock(ch[max(i - 1, 0)], ch[i], ucfg, temb,
                      heads[i] if kind == "CrossAttnDownBlock2D" else None, downsample=i < last, depth=depths[i])
            for i, kind in enumerate(ucfg.down_block_types)])
        self.mid_block = MidBlock(ch[-1], ucfg, temb, heads[-1], depths[-1])
        # one zero conv per U-Net skip: conv_in's, then each level's resnets and downsampler
        skip_channels = [ch[0]] + [c for i, c in enumerate(ch) for _ in range(ucfg.layers_per_block + (i < last))]
        self.controlnet_down_blocks = nn.ModuleList([nn.Conv2d(c, c, 1) for c in skip_channels])
        self.controlnet_mid_block = nn.Conv2d(ch[-1], ch[-1], 1)

    def forward(self, sample: torch.Tensor, timestep: Union[torch.Tensor, float, int], context: torch.Tensor,
                control: torch.Tensor, scale: float = 1.0, guess_mode: bool = False,
                text_embeds: Optional[torch.Tensor] = None,
                time_ids: Optional[torch.Tensor] = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """sample: [B, 4, h, w] (the U-Net's 4 latent channels, scaled for the step); control: [B, 3, H, W] in
        [0, 1] with H = h * downsample_factor. -> (one residual per U-Net skip, the mid residual), times
        `scale`; in guess mode the skips' scales ramp from 0.1 (shallowest) to 1 (mid), as diffusers does.
        SDXL ControlNets also take the U-Net's text_embeds [B, P] and time_ids [B, n]."""
        down, mid = self.unscaled(sample, timestep, context, control, text_embeds, time_ids)
        return scale_residuals(self.config, down, mid, scale, guess_mode)

    def unscaled(self, sample: torch.Tensor, timestep: Union[torch.Tensor, float, int], context: torch.Tensor,
                 control: torch.Tensor, text_embeds: Optional[torch.Tensor] = None,
                 time_ids: Optional[torch.Tensor] = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The zero convs' outputs before `scale_residuals` (what an exported ControlNet graph computes)."""
        if self.config.channel_order == "bgr":
            control = control.flip(1)
        temb = embed_timestep(self.time_embedding, self.config.unet, timestep, sample)
        if self.add_embedding is not None:
            temb = temb + added_embedding(self.add_embedding, self.config.unet, text_embeds, time_ids, sample.dtype)
        x = self.conv_in(sample) + self.controlnet_cond_embedding(control)
        mid, skips = encode(self, x, temb, context)
        return [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips)], self.controlnet_mid_block(mid)


def scale_residuals(cfg: ControlNetConfig, down: list[torch.Tensor], mid: torch.Tensor, scale: float,
                    guess_mode: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    """`scale` on every residual, or guess mode's ramp; averaged over space for global_pool_conditions."""
    if guess_mode and not cfg.global_pool_conditions:
        ramp = torch.logspace(-1, 0, len(down) + 1, device=mid.device) * scale
        down = [d * r for d, r in zip(down, ramp)]
        mid = mid * ramp[-1]
    else:
        down = [d * scale for d in down]
        mid = mid * scale
    if cfg.global_pool_conditions:
        down = [d.mean(dim=(2, 3), keepdim=True) for d in down]
        mid = mid.mean(dim=(2, 3), keepdim=True)
    return down, mid


def skip_shapes(cfg: UNetConfig, batch: int, height: int, width: int) -> list[tuple[int, int, int, int]]:
    """The U-Net's skips (= a ControlNet's down residuals) for latents [batch, *, height, width]: conv_in's,
    then each level's resnets and downsampler (a stride-2 conv: ceil of half the side)."""
    ch, last = cfg.block_out_channels, len(cfg.block_out_channels) - 1
    shapes, h, w = [(batch, ch[0], height, width)], height, width
    for i, c in enumerate(ch):
        shapes += [(batch, c, h, w)] * cfg.layers_per_block
        if i < last:
            h, w = -(-h // 2), -(-w // 2)
            shapes.append((batch, c, h, w))
    return shapes
