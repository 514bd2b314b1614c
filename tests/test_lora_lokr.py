"""LyCORIS LoKr (`lokr_w1` / `lokr_w1_a`+`lokr_w1_b`, `lokr_w2` / `lokr_w2_a`+`lokr_w2_b`, alpha): the fused
weight against a delta computed here by hand, element by element from the Kronecker product's definition
(delta[a*o2+b, c*i2+d] = w1[a, c] * w2[b, d]), times scale * alpha / rank. Tolerance: 1e-6 (float32 sums)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import sdrt
from sdrt.errors import LoraFileError

from factories import save_pipeline


def _hand_kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    (o1, i1), (o2, i2) = w1.shape, w2.shape
    out = torch.empty(o1 * o2, i1 * i2)
    for a in range(o1):
        for c in range(i1):
            out[a * o2:(a + 1) * o2, c * i2:(c + 1) * i2] = w1[a, c] * w2
    return out


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("lokr")
    save_pipeline(root / "model", "sd1")
    return sdrt.load(root / "model", device="cpu", dtype="float32")


def test_lokr_linear_and_conv_match_the_hand_computed_delta(pipe, tmp_path):
    g = torch.Generator().manual_seed(0)
    linear = dict(pipe.unet.named_modules())["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    conv = dict(pipe.unet.named_modules())["down_blocks.0.resnets.0.conv1"]
    o, i = linear.weight.shape
    co, ci, kh, kw = conv.weight.shape
    lin_w1 = torch.randn(2, 4, generator=g)                                   # whole
    lin_w2a, lin_w2b = torch.randn(o // 2, 3, generator=g), torch.randn(3, i // 4, generator=g)  # rank 3
    conv_w1a, conv_w1b = torch.randn(4, 2, generator=g), torch.randn(2, 2, generator=g)          # rank 2
    conv_w2 = torch.randn(co // 4, ci // 2, kh, kw, generator=g)              # whole, carries the kernel
    lin_key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    conv_key = "lora_unet_down_blocks_0_resnets_0_conv1"
    save_file({f"{lin_key}.lokr_w1": lin_w1, f"{lin_key}.lokr_w2_a": lin_w2a, f"{lin_key}.lokr_w2_b": lin_w2b,
               f"{lin_key}.alpha": torch.tensor(1.5),
               f"{conv_key}.lokr_w1_a": conv_w1a, f"{conv_key}.lokr_w1_b": conv_w1b,
               f"{conv_key}.lokr_w2": conv_w2, f"{conv_key}.alpha": torch.tensor(4.0)}, str(tmp_path / "k.safetensors"))
    lin0, conv0 = linear.weight.detach().clone(), conv.weight.detach().clone()
    pipe.load_lora(tmp_path / "k.safetensors", scale=0.5)
    try:
        lin_delta = _hand_kron(lin_w1, lin_w2a @ lin_w2b) * (1.5 / 3)
        conv_delta = _hand_kron(conv_w1a @ conv_w1b, conv_w2.flatten(1)).reshape(conv0.shape) * (4.0 / 2)
        torch.testing.assert_close(linear.weight, lin0 + 0.5 * lin_delta, rtol=0, atol=1e-6)
        torch.testing.assert_close(conv.weight, conv0 + 0.5 * conv_delta, rtol=0, atol=1e-6)
    finally:
        pipe.unload_lora()
    assert torch.equal(linear.weight, lin0) and torch.equal(conv.weight, conv0)


def test_lokr_with_a_missing_or_misshapen_factor_is_refused(pipe, tmp_path):
    key = "lora_unet_down_blocks_0_resnets_0_conv1"
    save_file({f"{key}.lokr_w1": torch.ones(2, 2)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(LoraFileError, match="missing k2"):
        pipe.load_lora(tmp_path / "half.safetensors")
    save_file({f"{key}.lokr_w1": torch.ones(3, 2), f"{key}.lokr_w2": torch.ones(3, 2)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(LoraFileError, match="does not fit"):
        pipe.load_lora(tmp_path / "bad.safetensors")
    assert pipe.loras == {}
