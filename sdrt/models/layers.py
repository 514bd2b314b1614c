"""Blocks shared by the VAE and the U-Net. Parameter names follow diffusers' state-dict keys, so a
diffusers checkpoint loads with no renaming."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from sdrt.models import ops


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm routed through the kernel dispatch point, with SiLU optionally fused after it."""

    def __init__(self, num_groups: int, num_channels: int, eps: float, silu: bool = False):
        super().__init__(num_groups, num_channels, eps)
        self.silu = silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.silu)


class Attention(nn.Module):
    """Multi-head attention over token sequences; cross-attention when `context_dim` is given.
    upcast: scores and softmax in float32 in any dtype (diffusers' upcast_attention; see sdrt.models.ops)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: Optional[int] = None,
                 qkv_bias: bool = False, upcast: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim, self.upcast = heads, head_dim, upcast
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        # x: [B, L, dim], context: [B, Lc, context_dim]
        context = x if context is None else context
        b, lq, lk = x.shape[0], x.shape[1], context.shape[1]
        # [B, L, H, D] viewed as [B, H, L, D]: the kernels take strided views, no copy here
        q = self.to_q(x).view(b, lq, self.heads, self.head_dim).transpose(1, 2)
        k = self.to_k(context).view(b, lk, self.heads, self.head_dim).transpose(1, 2)
        v = self.to_v(context).view(b, lk, self.heads, self.head_dim).transpose(1, 2)
        out = ops.attention(q, k, v, upcast=self.upcast)
        return self.to_out[0](out.transpose(1, 2).reshape(b, lq, self.heads * self.head_dim))


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float,
                 temb_channels: Optional[int] = None, output_scale: float = 1.0):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps, silu=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = GroupNorm(groups, out_channels, eps, silu=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale = output_scale

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        # x: [B, C, H, W], temb: [B or 1, T]
        h = self.conv1(self.norm1(x))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.norm2(h))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = shortcut + h
        return out if self.output_scale == 1.0 else out / self.output_scale


class Downsample(nn.Module):
    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:  # the VAE's asymmetric padding, as in the original LDM code
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: Optional[tuple] = None) -> torch.Tensor:
        # `size` lets the U-Net match its skip connection when H or W is not a multiple of 2**levels
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of [B] timesteps -> [B, dim] float32 (diffusers' get_timestep_embedding)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = timesteps[:, None].float() * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb
