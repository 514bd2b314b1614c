"""U-Net parity: random-weight diffusers UNet2DConditionModel folders, loaded by sdrt, same outputs.

Tolerance: max abs error <= 1e-4 in fp32 on CPU (both sides are fp32 torch; the difference is
summation order only).
"""
from __future__ import annotations

import pytest
import torch

from sdrt.components import load_component

ATOL = 1e-4

SD1 = dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8)
# SD 2.x: linear projections, per-block head counts given as a list, upcast attention
SD2 = dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=48, attention_head_dim=[2, 4],
           use_linear_projection=True, upcast_attention=True)
THREE_LEVELS = dict(block_out_channels=(32, 32, 64), layers_per_block=2,
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                    cross_attention_dim=32, attention_head_dim=4)
INPAINT = dict(SD1, in_channels=9)

CONFIGS = {"sd1": SD1, "sd2": SD2, "three_levels": THREE_LEVELS, "inpaint": INPAINT}


def save_diffusers_unet(path, seed: int = 0, **config):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(sample_size=8, norm_num_groups=16, out_channels=4, **config).eval()
    # diffusers zero-initialises conv_out and a few projections; random values everywhere make parity meaningful
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(str(path))
    return model


def inputs(model, batch: int, h: int, w: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, model.config.in_channels, h, w, generator=g)
    timesteps = torch.randint(0, 1000, (batch,), generator=g)  # per-sample timesteps
    context = torch.randn(batch, 7, model.config.cross_attention_dim, generator=g)
    return sample, timesteps, context


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (diffusers model, sdrt model), each config saved and loaded once."""
    out = {}
    for name, config in CONFIGS.items():
        path = tmp_path_factory.mktemp(f"unet_{name}")
        ref = save_diffusers_unet(path, **config)
        out[name] = (ref, load_component(path, "unet"))
    return out


@pytest.mark.parametrize("name,batch,h,w", [
    ("sd1", 2, 8, 8),
    ("sd1", 1, 12, 20),
    ("sd2", 2, 8, 12),
    ("sd2", 1, 10, 14),
    ("three_levels", 2, 8, 8),
    ("three_levels", 1, 12, 20),
    ("three_levels", 1, 10, 14),   # 10 -> 5 -> 3: upsampling must follow the skip sizes
    ("inpaint", 2, 8, 8),
])
def test_unet_matches_diffusers(saved, name, batch, h, w):
    ref, ours = saved[name]
    sample, timesteps, context = inputs(ref, batch, h, w)
    with torch.no_grad():
        expected = ref(sample, timesteps, encoder_hidden_states=context).sample
        got = ours(sample, timesteps, context)
    assert got.shape == expected.shape == (batch, 4, h, w)
    assert (got - expected).abs().max().item() <= ATOL


def test_unet_scalar_timestep_broadcasts(saved):
    ref, ours = saved["sd1"]
    sample, _, context = inputs(ref, 2, 8, 8)
    with torch.no_grad():
        expected = ref(sample, 500, encoder_hidden_states=context).sample
        for t in (500, torch.tensor(500), torch.tensor([500])):
            assert (ours(sample, t, context) - expected).abs().max().item() <= ATOL


def test_unet_channels_last_input_gives_same_result(saved):
    ref, ours = saved["three_levels"]
    sample, timesteps, context = inputs(ref, 2, 12, 20)
    with torch.no_grad():
        contiguous = ours(sample, timesteps, context)
        channels_last = ours(sample.to(memory_format=torch.channels_last), timesteps, context)
    assert (channels_last - contiguous).abs().max().item() <= ATOL


def test_unet_loads_as_float16(tmp_path):
    save_diffusers_unet(tmp_path, **SD1)
    ours = load_component(tmp_path, "unet", dtype=torch.float16)
    assert {p.dtype for p in ours.parameters()} == {torch.float16}
    assert not any(p.is_meta for p in ours.parameters())
