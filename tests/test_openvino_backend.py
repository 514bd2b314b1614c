"""The `openvino` backend end to end on the tiny model: `sdrt.load(M, backend="openvino")` compiles the cached
ONNX export with OpenVINO and gives the `torch` backend's image within 2/255 (SD and SDXL); `sdrt check --backend
openvino` passes; at 32x32 the U-Net and VAE run Winograd convolutions (sdrt.backends.openvino_winograd) and a new
shape recompiles; `backend="auto"` on a CPU picks the fastest installed backend as measured (openvino first)."""
from __future__ import annotations

import numpy as np
import pytest

import sdrt
from factories import save_pipeline
from sdrt import parity
from sdrt.backends.auto import resolve_backend


IMAGE_TOL = 2 / 255


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("ov")
    save_pipeline(root / "sd1", "sd1")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SDRT_CACHE", str(root / "cache"))
        yield (sdrt.load(root / "sd1", backend="torch"), sdrt.load(root / "sd1", backend="openvino"),
               sdrt.load(root / "sd1", backend="auto", device="cpu"))


def test_auto_on_cpu_picks_the_fastest_installed_backend(monkeypatch):
    import importlib.util

    import torch
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "openvino"  # both installed (the test extra): the measured order
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    assert resolve_backend("auto", cpu) == "onnxruntime"
    assert resolve_backend("auto", cpu, torch.float16) == "torch"  # the exported CPU paths run fp32
    assert resolve_backend("torch", cpu) == "torch"
    with pytest.raises(sdrt.InvalidInputError, match="backend must be one of auto"):
        resolve_backend("fast", torch.device("cpu"))


def test_txt2img_matches_torch_backend(model):
    torch_pipe, ov_pipe, auto_pipe = model
    kwargs = dict(prompt=["a red cube", "a cat"], negative_prompt="blurry", steps=4, seed=3, output="np")
    ref, got = torch_pipe(**kwargs), ov_pipe(**kwargs)
    assert got.images.shape == ref.images.shape == (2, 16, 16, 3)
    assert np.abs(got.images - ref.images).max() <= IMAGE_TOL
    assert auto_pipe.backend == "openvino" and np.abs(auto_pipe(**kwargs).images - ref.images).max() <= IMAGE_TOL


def test_img2img_matches_torch_backend(model):
    torch_pipe, ov_pipe, _ = model
    image = (np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3) * 7) % 255
    kwargs = dict(prompt="a cat", image=image, strength=0.6, steps=4, seed=1, output="np")
    assert np.abs(ov_pipe(**kwargs).images - torch_pipe(**kwargs).images).max() <= IMAGE_TOL


def test_check_passes_on_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("SDRT_CACHE", str(tmp_path))
    report = parity.compare("random:tiny", "openvino", device="cpu", steps=4)
    assert report.passed, report.table()


def test_sdxl_base_matches_torch_backend(tmp_path, monkeypatch):
    from sdxl_factories import save_sdxl

    monkeypatch.setenv("SDRT_CACHE", str(tmp_path / "cache"))
    save_sdxl(tmp_path / "base")
    ref, got = sdrt.load(tmp_path / "base", backend="torch"), sdrt.load(tmp_path / "base", backend="openvino")
    kwargs = dict(prompt="a red cube", negative_prompt="blurry", steps=3, guidance_scale=5.0, seed=2, output="np")
    assert np.abs(got(**kwargs).images - ref(**kwargs).images).max() <= IMAGE_TOL


def test_lora_is_refused_with_the_backends_that_take_it(model, tmp_path):
    from lora_files import write_kohya

    torch_pipe, ov_pipe, _ = model
    write_kohya(tmp_path / "style.safetensors", torch_pipe, seed=0)
    assert ov_pipe.unet.module is None and ov_pipe.text_encoder.module is None  # freed: nothing could use them
    with pytest.raises(sdrt.BackendUnavailableError, match="cannot take new weights: LoRA runs on the torch, triton"):
        ov_pipe.load_lora(tmp_path / "style.safetensors")


def test_pipeline_with_winograd_layers_matches_torch(model):
    torch_pipe, ov_pipe, _ = model
    kwargs = dict(prompt=["a red cube", "a cat"], steps=4, seed=5, height=32, width=32, output="np")
    ref, got = torch_pipe(**kwargs), ov_pipe(**kwargs)
    # 32x32 images: 16x16 latents, a CFG batch of 4: 64 tiles per U-Net 3x3 convolution at the top level
    assert ov_pipe.unet.runner.winograd_layers > 0 and ov_pipe.vae.decoder.winograd_layers > 0
    assert np.abs(got.images - ref.images).max() <= IMAGE_TOL


def test_new_shapes_recompile(model):
    _, ov_pipe, _ = model
    runner = ov_pipe.unet.runner
    first = ov_pipe(prompt="a cat", steps=2, seed=1, height=16, width=16, output="np").images
    shapes = runner.shapes
    ov_pipe(prompt="a cat", steps=2, seed=1, height=24, width=32, output="np")
    assert runner.shapes != shapes and runner.shapes[0][-2:] == (12, 16)
    again = ov_pipe(prompt="a cat", steps=2, seed=1, height=16, width=16, output="np").images
    assert np.array_equal(first, again)  # a recompiled model gives the same image
