"""UNet2DConditionModel for SD 1.x / 2.x / XL: noise (or v) prediction from (latents, timestep, text context),
plus SDXL's added "text_time" conditioning (pooled text embeds and size/crop ids)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from sdrt.config import UNetConfig
from sdrt.errors import InvalidInputError
from sdrt.models.layers import Attention, Downsample, GroupNorm, ResnetBlock, Upsample, timestep_embedding

_TRANSFORMER_NORM_EPS = 1e-6  # diffusers' Transformer2DModel GroupNorm


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # the Identity holds the dropout's slot so the keys stay diffusers' ff.net.0 / ff.net.2
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool):
        super().__init__()
        head_dim = dim // heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """diffusers' Transformer2DModel: GroupNorm, project in, `depth` transformer blocks, project out, residual."""

    def __init__(self, channels: int, heads: int, cfg: UNetConfig, depth: int = 1):
        super().__init__()
        self.linear_projection = linear_projection = cfg.use_linear_projection
        self.norm = GroupNorm(cfg.norm_num_groups, channels, _TRANSFORMER_NORM_EPS)
        proj = (lambda: nn.Linear(channels, channels)) if linear_projection else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList([
            TransformerBlock(channels, heads, cfg.cross_attention_dim, cfg.upcast_attention) for _ in range(depth)])
        self.proj_out = proj()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.linear_projection:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # free for channels-last activations
        if self.linear_projection:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.linear_projection:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, c).permute(0, 3, 1, 2)
        if not self.linear_projection:
            x = self.proj_out(x)
        return x + residual


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D (with `heads`) or DownBlock2D (heads=None)."""

    def __init__(self, in_channels: int, out_channels: int, cfg: UNetConfig, temb: int,
                 heads: Optional[int], downsample: bool, depth: int = 1):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, g, eps, temb)
                                      for i in range(cfg.layers_per_block)])
        self.attentions = nn.ModuleList([SpatialTransformer(out_channels, heads, cfg, depth)
                                         for _ in range(cfg.layers_per_block)]) if heads else None
        self.downsamplers = nn.ModuleList([Downsample(out_channels, cfg.downsample_padding)]) if downsample else None

    def forward(self, x, temb, context) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D (with `heads`) or UpBlock2D; consumes layers_per_block + 1 skip connections."""

    def __init__(self, prev_channels: int, out_channels: int, skip_in_channels: int, cfg: UNetConfig, temb: int,
                 heads: Optional[int], upsample: bool, depth: int = 1):
        super().__init__()
        g, eps, n = cfg.norm_num_groups, cfg.norm_eps, cfg.layers_per_block + 1
        self.resnets = nn.ModuleList([
            ResnetBlock((prev_channels if i == 0 else out_channels) + (skip_in_channels if i == n - 1 else out_channels),
                        out_channels, g, eps, temb)
            for i in range(n)])
        self.attentions = nn.ModuleList([SpatialTransformer(out_channels, heads, cfg, depth)
                                         for _ in range(n)]) if heads else None
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, x, skips: list[torch.Tensor], temb, context, upsample_size=None) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels: int, cfg: UNetConfig, temb: int, heads: int, depth: int = 1):
        super().__init__()
        g, eps, scale = cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_scale_factor
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, g, eps, temb, scale) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialTransformer(channels, heads, cfg, depth)])

    def forward(self, x, temb, context) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def embed_timestep(time_embedding: TimestepEmbedding, cfg: UNetConfig, timestep: Union[torch.Tensor, float, int],
                   sample: torch.Tensor) -> torch.Tensor:
    """The time embedding [1 or B, 4 * C0] of `timestep` (scalar or [B]) for `sample` [B, ...]."""
    if not torch.is_tensor(timestep):
        timestep = torch.tensor(timestep, device=sample.device)
    # a scalar timestep is embedded once ([1, T], broadcast by the blocks): a sample's numbers then do not
    # depend on the batch size (a CPU matmul of a few rows picks its kernel by the row count)
    timesteps = timestep.reshape(1) if timestep.dim() == 0 else timestep.reshape(-1).expand(sample.shape[0])
    t_emb = timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
    return time_embedding(t_emb.to(sample.dtype))


def encode(model: nn.Module, x: torch.Tensor, temb: torch.Tensor,
           context: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The encoder half shared by the U-Net and the ControlNet: `model.down_blocks` then `model.mid_block` on
    x (conv_in's output) -> (mid block output, every skip: conv_in's output, then each block's)."""
    skips = [x]
    for block in model.down_blocks:
        x, block_skips = block(x, temb, context)
        skips.extend(block_skips)
    return model.mid_block(x, temb, context), skips


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        ch, heads, depths = cfg.block_out_channels, cfg.heads(), cfg.transformer_depths()
        temb = 4 * ch[0]
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        # SDXL: [pooled text embeds, sinusoidal embedding of each size/crop id] -> added to the time embedding
        self.add_embedding = (TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb)
                              if cfg.addition_embed_type == "text_time" else None)

        last = len(ch) - 1
        self.down_blocks = nn.ModuleList([
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg, temb,
                      heads[i] if kind == "CrossAttnDownBlock2D" else None, downsample=i < last, depth=depths[i])
            for i, kind in enumerate(cfg.down_block_types)])
        self.mid_block = MidBlock(ch[-1], cfg, temb, heads[-1], depths[-1])
        rch, rheads, rdepths = tuple(reversed(ch)), tuple(reversed(heads)), tuple(reversed(depths))
        self.up_blocks = nn.ModuleList([
            UpBlock(rch[max(i - 1, 0)], rch[i], rch[min(i + 1, last)], cfg, temb,
                    rheads[i] if kind == "CrossAttnUpBlock2D" else None, upsample=i < last, depth=rdepths[i])
            for i, kind in enumerate(cfg.up_block_types)])
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[0], cfg.norm_eps, silu=True)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: Union[torch.Tensor, float, int], context: torch.Tensor,
                down_residuals: Optional[Sequence[torch.Tensor]] = None,
                mid_residual: Optional[torch.Tensor] = None, text_embeds: Optional[torch.Tensor] = None,
                time_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        # sample: [B, in_channels, h, w]; timestep: scalar or [B]; context: [B, 77, cross_attention_dim]
        # down_residuals / mid_residual: a ControlNet's additions to every skip and to the mid block's output
        # SDXL only: text_embeds [B, pooled width]; time_ids [B, n] (sizes and crops, or the refiner's score)
        temb = embed_timestep(self.time_embedding, self.config, timestep, sample)
        if self.add_embedding is not None:
            temb = temb + self._added_embedding(text_embeds, time_ids, sample.dtype)
        x, skips = encode(self, self.conv_in(sample), temb, context)
        if down_residuals is not None:
            skips = [s + r for s, r in zip(skips, down_residuals, strict=True)]
        if mid_residual is not None:
            x = x + mid_residual
        n = self.config.layers_per_block + 1
        for block in self.up_blocks:
            block_skips, skips = skips[-n:], skips[:-n]
            # upsample to the next skip's size, so odd latent sizes line up as diffusers does
            x = block(x, block_skips, temb, context, upsample_size=skips[-1].shape[-2:] if skips else None)
        return self.conv_out(self.conv_norm_out(x))

    def _added_embedding(self, text_embeds: Optional[torch.Tensor], time_ids: Optional[torch.Tensor],
                         dtype: torch.dtype) -> torch.Tensor:
        return added_embedding(self.add_embedding, self.config, text_embeds, time_ids, dtype)


def added_embedding(add_embedding: TimestepEmbedding, cfg: UNetConfig, text_embeds: Optional[torch.Tensor],
                    time_ids: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """diffusers' "text_time" embedding: [text_embeds, sinusoid(each id)] -> [B, T] (the U-Net's and an SDXL
    ControlNet's)."""
    if text_embeds is None or time_ids is None:
        raise InvalidInputError("this U-Net (addition_embed_type='text_time', SDXL) needs text_embeds and time_ids")
    width = text_embeds.shape[-1] + time_ids.shape[-1] * cfg.addition_time_embed_dim
    if text_embeds.dim() != 2 or time_ids.dim() != 2 or width != cfg.projection_class_embeddings_input_dim:
        raise InvalidInputError(f"text_embeds [B, P] and time_ids [B, n] must give P + n * "
                                f"{cfg.addition_time_embed_dim} = {cfg.projection_class_embeddings_input_dim}, "
                                f"got {list(text_embeds.shape)} and {list(time_ids.shape)}")
    ids = timestep_embedding(time_ids.flatten(), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
    added = torch.cat([text_embeds, ids.reshape(text_embeds.shape[0], -1).to(text_embeds.dtype)], dim=-1)
    return add_embedding(added.to(dtype))
