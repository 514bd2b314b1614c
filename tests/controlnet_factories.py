"""Tiny random-weight diffusers ControlNets that fit the tiny SD 1.x models of `factories` (saved with
save_pretrained), and a control image for them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import torch

# the tiny SD 1.x U-Net's encoder (factories.diffusers_pipeline), and a hint tower of the VAE's factor 2
TINY_SD1 = dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",
                                                                                   "DownBlock2D"),
                cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32,
                conditioning_embedding_out_channels=(16, 32))


def diffusers_controlnet(seed: int, **overrides):
    """diffusers' own initialisation, except the zero-initialised convs: small random values there, so the
    ControlNet changes the picture (but does not swamp the U-Net)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    return randomize_zero_convs(ControlNetModel(**{**TINY_SD1, **overrides}), seed)


def randomize_zero_convs(net, seed: int):
    g = torch.Generator().manual_seed(seed + 1000)
    zero_init = [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero_init:
            for p in conv.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net.eval()


def save_sdxl_controlnet(path: Path, unet, seed: int):
    """A tiny SDXL ControlNet made from `unet` (diffusers' from_unet: its encoder's weights, text_time
    embedding included), zero convs randomised; saved at `path`."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = randomize_zero_convs(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32)), seed)
    net.save_pretrained(str(path), safe_serialization=True)
    return net


def save_controlnet(path: Path, seed: int, **overrides):
    """Save a tiny ControlNet folder at `path`; returns the diffusers model."""
    net = diffusers_controlnet(seed, **overrides)
    net.save_pretrained(str(path), safe_serialization=True)
    return net


def control_picture(size: int = 16, seed: int = 11) -> PIL.Image.Image:
    """Blocky random RGB, the kind of picture an edge map or a pose drawing is (not smooth noise)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 2, (size // 4, size // 4, 3), dtype=np.uint8) * 255
    return PIL.Image.fromarray(blocks.repeat(4, axis=0).repeat(4, axis=1))
