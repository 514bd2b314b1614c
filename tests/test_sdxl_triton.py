"""SDXL on the triton backend: the tiny SDXL (tests/sdxl_factories.py: per-level transformer depth (1, 2), the
"text_time" added embedding) against the torch backend on the same folder, in Triton's interpreter on a CPU.

The interpreter runs each kernel program in Python, so the CPU run is as small as the SD1 test's
(tests/test_triton_backend.py): one step at 8x8 pixels (4x4 latents) without CFG, one U-Net call with
text_embeds/time_ids and one VAE decode; its tolerance is that test's. The refiner is only prepared (no
first encoder). The CUDA test (fp16, CUDA-graphed loop and text encoders) skips without a GPU.
Target: < 35 s on 2 CPU cores.
"""
from __future__ import annotations

import pytest
import torch

import sdrt
from sdrt.backends.triton_backend import TritonTextEncoder, TritonUNet
from sdrt.graphs import DenoiseGraphs
from sdxl_factories import save_sdxl

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for name in ("base", "refiner"):
        out[name] = tmp_path_factory.mktemp(f"sdxl-{name}")
        save_sdxl(out[name], refiner=name == "refiner")
    return out


def test_sdxl_generation_matches_the_torch_backend(folders):
    settings = dict(prompt="a red cube", steps=1, guidance_scale=1.0, height=8, width=8, seed=0, output="np",
                    original_size=(24, 16), crops_coords_top_left=(2, 0))
    ref = sdrt.load(folders["base"], device=DEVICE, dtype="float32")(**settings)
    pipe = sdrt.load(folders["base"], backend="triton", device=DEVICE, dtype="float32")
    assert isinstance(pipe.unet, TritonUNet) and isinstance(pipe.text_encoder_2, TritonTextEncoder)
    assert pipe.unet.module.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.unet.config.transformer_depths() == (1, 2)
    out = pipe(**settings)
    # fp32 both ways, the SD1 test's bounds: only the kernels' summation order differs (GroupNorm
    # statistics, softmax sums), about 1e-6 relative per layer: 1e-5 of the latents' magnitude with margin.
    scale = ref.latents.abs().max().item()
    assert (out.latents - ref.latents).abs().max().item() <= 1e-5 * scale
    assert abs(out.images - ref.images).max() <= 1e-4


def test_sdxl_refiner_prepares_without_a_first_encoder(folders):
    pipe = sdrt.load(folders["refiner"], backend="triton", device=DEVICE, dtype="float32")
    assert pipe.text_encoder is None and isinstance(pipe.text_encoder_2, TritonTextEncoder)
    assert pipe.requires_aesthetics_score and isinstance(pipe.unet, TritonUNet)


@requires_cuda
def test_fp16_graphed_sdxl_on_cuda_stays_near_the_fp32_reference(folders):
    settings = dict(prompt="a red cube", steps=4, guidance_scale=5.0, seed=0, output="np")
    ref = sdrt.load(folders["base"], device="cuda", dtype="float32")(**settings)
    half = sdrt.load(folders["base"], device="cuda", dtype="float16")(**settings)
    pipe = sdrt.load(folders["base"], backend="triton", device="cuda", dtype="float16")
    assert isinstance(pipe.denoiser, DenoiseGraphs)
    pipe.warmup(steps=4, guidance_scale=5.0)
    out = pipe(**settings)
    torch_err = (half.latents - ref.latents).abs().max().item()
    err = (out.latents - ref.latents).abs().max().item()
    assert err <= 2 * torch_err + 1e-3, f"triton fp16 error {err:.3g} vs torch fp16 error {torch_err:.3g}"
    pipe(**settings, original_size=(2048, 2048), crops_coords_top_left=(64, 0))  # new ids: the same capture
    assert pipe.denoiser.cache.captures == 1
