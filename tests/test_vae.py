"""VAE parity: random-weight diffusers AutoencoderKL folders, loaded by sdrt, same encode mean and decode.

Tolerance: max abs error <= 1e-3 in fp32 on CPU.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdrt.components import load_component

ATOL = 1e-3

TWO_LEVELS = dict(block_out_channels=(32, 64), layers_per_block=1)
THREE_LEVELS = dict(block_out_channels=(32, 32, 64), layers_per_block=2)


def save_diffusers_vae(path, seed: int = 0, block_out_channels=(32, 64), layers_per_block=1):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(block_out_channels)
    model = AutoencoderKL(block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                          down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                          latent_channels=4, norm_num_groups=32, sample_size=32).eval()
    with torch.no_grad():  # random everywhere, norms included, so every tensor shows in the output
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(str(path))
    return model


@pytest.fixture(scope="module", params=["two_levels", "three_levels"])
def vae_pair(request, tmp_path_factory):
    config = {"two_levels": TWO_LEVELS, "three_levels": THREE_LEVELS}[request.param]
    path = tmp_path_factory.mktemp(f"vae_{request.param}")
    ref = save_diffusers_vae(path, **config)
    return ref, load_component(path, "vae")


@pytest.mark.parametrize("batch,h,w", [(2, 16, 16), (1, 24, 40)])
def test_vae_encode_mean_matches_diffusers(vae_pair, batch, h, w):
    ref, ours = vae_pair
    images = torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(images).latent_dist
        mean, logvar = ours.encode(images)
    assert mean.shape == dist.mean.shape
    assert (mean - dist.mean).abs().max().item() <= ATOL
    assert (logvar - dist.logvar).abs().max().item() <= ATOL


@pytest.mark.parametrize("batch,h,w", [(2, 4, 4), (1, 3, 5)])
def test_vae_decode_matches_diffusers(vae_pair, batch, h, w):
    ref, ours = vae_pair
    latents = torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref.decode(latents).sample
        got = ours.decode(latents)
    scale = 2 ** (len(ours.config.block_out_channels) - 1)
    assert got.shape == expected.shape == (batch, 3, h * scale, w * scale)
    assert (got - expected).abs().max().item() <= ATOL


def test_vae_channels_last_input_gives_same_result(vae_pair):
    _, ours = vae_pair
    latents = torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        contiguous = ours.decode(latents)
        channels_last = ours.decode(latents.to(memory_format=torch.channels_last))
    assert (channels_last - contiguous).abs().max().item() <= ATOL


def test_vae_legacy_attention_names_load(tmp_path):
    """SD 1.5's Hub VAE names the mid-block attention query/key/value/proj_attn; older files store them as 1x1 convs."""
    ref = save_diffusers_vae(tmp_path, **TWO_LEVELS)
    file = tmp_path / "diffusion_pytorch_model.safetensors"
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in load_file(str(file)).items():
        for new, old in legacy.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                value = value[:, :, None, None].contiguous() if value.dim() == 2 else value
        renamed[key] = value
    assert any(".proj_attn." in k for k in renamed)
    save_file(renamed, str(file))
    ours = load_component(tmp_path, "vae")
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours.decode(latents) - ref.decode(latents).sample).abs().max().item() <= ATOL
