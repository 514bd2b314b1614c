"""pytest-benchmark suite: one component call or kernel per benchmark, torch against the Triton path.

    python -m pytest bench/test_bench_components.py --benchmark-json=OUT.json   (not part of `pytest tests`)

On CUDA: the SD 1.5 config (random weights, fp16, 512x512, CFG batch 2) - U-Net step with torch ops vs
the Triton kernels (channels-last), the U-Net step captured in a CUDA graph, the VAE decode in fp16 vs
fp32 (the cost the triton backend avoids by decoding in fp16 with an overflow check, see
sdrt/backends/triton_backend.py), the text encoder, and the two kernels at their largest U-Net shapes.
On a CPU: the tiny config, torch ops only, so the suite runs anywhere.
"""
from __future__ import annotations

import copy

import pytest
import torch

from sdrt.models import random_weights
from sdrt.graphs import CapturedCall
from sdrt.models.ops import use_kernels

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.float16 if CUDA else torch.float32
MODEL, SIZE = ("sd15", 512) if CUDA else ("tiny", 16)
requires_cuda = pytest.mark.skipif(not CUDA, reason="the Triton kernels and CUDA graphs need a CUDA GPU")


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _bench(benchmark, fn):
    fn()  # compile / autotune outside the timed rounds
    _sync()

    def timed():
        fn()
        _sync()
    benchmark.pedantic(timed, rounds=10 if CUDA else 5, warmup_rounds=2)


@pytest.fixture(scope="module")
def parts():
    return random_weights.components(MODEL, device=DEVICE, dtype=DTYPE)


@pytest.fixture(scope="module")
def unet_inputs(parts):
    side = SIZE // parts.vae.config.downsample_factor
    x = torch.randn(2, 4, side, side, device=DEVICE, dtype=DTYPE)
    ctx = torch.randn(2, 77, parts.unet.config.cross_attention_dim, device=DEVICE, dtype=DTYPE)
    return x, torch.tensor(500, device=DEVICE), ctx


@torch.inference_mode()
def test_unet_step_torch(benchmark, parts, unet_inputs):
    _bench(benchmark, lambda: parts.unet(*unet_inputs))


@requires_cuda
@torch.inference_mode()
def test_unet_step_triton_channels_last(benchmark, parts, unet_inputs):
    from sdrt.kernels import TritonKernels
    unet = copy.deepcopy(parts.unet).to(memory_format=torch.channels_last)
    x, t, ctx = unet_inputs
    x = x.contiguous(memory_format=torch.channels_last)
    kernels = TritonKernels()

    def step():
        with use_kernels(kernels):
            return unet(x, t, ctx)
    _bench(benchmark, step)


@requires_cuda
@torch.inference_mode()
def test_unet_step_triton_graphed(benchmark, parts, unet_inputs):
    from sdrt.kernels import TritonKernels
    unet = copy.deepcopy(parts.unet).to(memory_format=torch.channels_last)
    kernels = TritonKernels()

    def step(x, t, ctx):
        with use_kernels(kernels):
            return unet(x.contiguous(memory_format=torch.channels_last), t, ctx)
    call = CapturedCall(step, unet_inputs, capture=True)
    _bench(benchmark, lambda: call(*unet_inputs))


@pytest.mark.parametrize("vae_dtype", [DTYPE, torch.float32], ids=["model-dtype", "float32"])
@torch.inference_mode()
def test_vae_decode(benchmark, parts, unet_inputs, vae_dtype):
    vae = copy.deepcopy(parts.vae).to(vae_dtype)
    latents = unet_inputs[0][:1].to(vae_dtype)
    _bench(benchmark, lambda: vae.decode(latents))


@torch.inference_mode()
def test_text_encoder(benchmark, parts):
    ids = parts.tokenizer(["", "a photograph of an astronaut riding a horse"]).to(DEVICE)
    _bench(benchmark, lambda: parts.text_encoder(ids))


@requires_cuda
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_group_norm_silu_320x64x64(benchmark, impl):
    import torch.nn.functional as F

    import sdrt.kernels
    x = torch.randn(2, 320, 64, 64, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    w, b = torch.randn(320, device="cuda", dtype=torch.float16), torch.randn(320, device="cuda", dtype=torch.float16)
    fn = (lambda: sdrt.kernels.group_norm(x, 32, w, b, 1e-5, True)) if impl == "triton" else \
        (lambda: F.silu(F.group_norm(x, 32, w, b, 1e-5)))
    _bench(benchmark, fn)


@requires_cuda
@pytest.mark.parametrize("impl", ["triton", "sdpa"])
def test_self_attention_4096_d40(benchmark, impl):
    import torch.nn.functional as F

    import sdrt.kernels
    q, k, v = (torch.randn(2, 4096, 8, 40, device="cuda", dtype=torch.float16).transpose(1, 2) for _ in range(3))
    fn = (lambda: sdrt.kernels.attention(q, k, v)) if impl == "triton" else \
        (lambda: F.scaled_dot_product_attention(q, k, v))
    _bench(benchmark, fn)
