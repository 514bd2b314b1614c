"""The triton backend: availability rules, the VAE's fp32 rerun on fp16 overflow, and (in Triton's
interpreter on a CPU, or compiled on CUDA) a generation against the torch backend on the same weights.

The interpreter runs each kernel program in Python, so the CPU run is one step at 8x8 pixels (4x4
latents) without CFG: one U-Net call and one VAE decode. Target: < 15 s on 2 CPU cores.
"""
from __future__ import annotations

import types

import pytest
import torch

import sdrt
from sdrt.backends.triton_backend import TritonVAE, prepare_triton
from sdrt.models import random_weights
from sdrt.graphs import DenoiseGraphs
from sdrt.models.ops import TorchKernels
from sdrt.pipeline import from_components

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(sdrt.BackendUnavailableError, match="needs CUDA"):
        prepare_triton(random_weights.components("tiny"), torch.device("cpu"), torch.float32)


def test_float64_is_refused():
    with pytest.raises(sdrt.InvalidInputError, match="dtype"):
        prepare_triton(random_weights.components("tiny"), torch.device(DEVICE), torch.float64)


class _OverflowingVAE(torch.nn.Module):
    """decode overflows in half precision (as SD's VAE decoder can), is finite in fp32."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.config = types.SimpleNamespace(scaling_factor=0.5)

    def decode(self, latents):
        big = latents * self.weight * 1e5  # beyond fp16's 65504: inf - inf = NaN in fp16
        return (big - 0.5 * big) / 5e4


def test_vae_decode_reruns_in_float32_on_overflow():
    vae = TritonVAE(_OverflowingVAE().half(), TorchKernels(), graphs=None)
    latents = torch.full((1, 4, 2, 2), 0.75, dtype=torch.float16)
    images = vae.decode(latents)
    assert images.dtype == torch.float16 and torch.equal(images, latents)
    assert vae.fallbacks == 1 and vae._fp32 is not None and vae.module.weight.dtype == torch.float16
    vae.decode(latents / 4)  # 18750 fits in fp16: no rerun
    assert vae.fallbacks == 1 and vae.scaling_factor == 0.5


def test_generation_matches_the_torch_backend():
    settings = dict(prompt="a red cube", steps=1, guidance_scale=1.0, height=8, width=8, seed=0, output="np")
    ref = from_components(random_weights.components("tiny", seed=4), device=DEVICE, dtype="float32")(**settings)
    pipe = from_components(random_weights.components("tiny", seed=4), backend="triton", device=DEVICE, dtype="float32")
    assert pipe.unet.module.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    out = pipe(**settings)
    # fp32 both ways: only the kernels' summation order differs (GroupNorm statistics, softmax sums), about
    # 1e-6 relative per layer over ~30 layers: 1e-5 of the latents' magnitude bounds it with margin.
    scale = ref.latents.abs().max().item()
    assert (out.latents - ref.latents).abs().max().item() <= 1e-5 * scale
    assert abs(out.images - ref.images).max() <= 1e-4


@requires_cuda
def test_fp16_graphed_generation_on_cuda_stays_near_the_fp32_reference():
    settings = dict(prompt="a red cube", steps=4, height=16, width=16, seed=0, output="np")
    ref = from_components(random_weights.components("tiny", seed=4), device="cuda", dtype="float32")(**settings)
    half = from_components(random_weights.components("tiny", seed=4), device="cuda", dtype="float16")(**settings)
    pipe = from_components(random_weights.components("tiny", seed=4), backend="triton", device="cuda", dtype="float16")
    assert isinstance(pipe.denoiser, DenoiseGraphs)
    pipe.warmup(16, 16, steps=4)
    out = pipe(**settings)
    torch_err = (half.latents - ref.latents).abs().max().item()
    err = (out.latents - ref.latents).abs().max().item()
    assert err <= 2 * torch_err + 1e-3, f"triton fp16 error {err:.3g} vs torch fp16 error {torch_err:.3g}"
    assert pipe.denoiser.cache.captures == 1
