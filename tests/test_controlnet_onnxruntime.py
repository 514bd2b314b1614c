"""ControlNets on the `onnxruntime` backend: the ControlNet graph and the U-Net graph with residual inputs
(`sdrt.export.control_contracts`) against the torch modules, and whole generations against the torch backend.

Tolerances: graph outputs vs the fp32 torch modules <= 1e-4 (summation order only); pictures within 2/255 of
the torch backend's (issue 17's acceptance)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import sdrt
from controlnet_factories import control_picture, save_controlnet
from factories import save_pipeline
from sdrt.export.control_graphs import GraphControlNet

IMAGE_TOL = 2 / 255
GRAPH_TOL = 1e-4


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("ort-controlnet")
    save_pipeline(root / "sd1", "sd1")
    nets = [root / "cn1", root / "cn2"]
    for seed, path in enumerate(nets, 1):
        save_controlnet(path, seed)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SDRT_CACHE", str(root / "cache"))
        yield (sdrt.load(root / "sd1", device="cpu", controlnet=nets),
               sdrt.load(root / "sd1", device="cpu", backend="onnxruntime", controlnet=nets), root)


def test_graphs_match_the_modules_at_another_size(pipes):
    """Traced at 8x8 latents, run at 6x10: the dynamic axes hold, residuals and noise match the modules."""
    torch_pipe, ort_pipe, _ = pipes
    g = torch.Generator().manual_seed(0)
    sample, context = torch.randn(2, 4, 6, 10, generator=g), torch.randn(2, 77, 128, generator=g)
    control, t = torch.rand(2, 3, 12, 20, generator=g), torch.tensor(501)
    graph, module = ort_pipe.controlnets[0], torch_pipe.controlnets[0]
    assert isinstance(graph, GraphControlNet)
    with torch.no_grad():
        for scale, guess in ((0.7, False), (1.0, True)):
            (got_down, got_mid), (ref_down, ref_mid) = (graph(sample, t, context, control, scale, guess),
                                                        module(sample, t, context, control, scale, guess))
            assert len(got_down) == len(ref_down) == 4
            for a, b in zip([*got_down, got_mid], [*ref_down, ref_mid]):
                assert a.shape == b.shape and (a - b).abs().max().item() <= GRAPH_TOL
        down, mid = module(sample, t, context, control)
        for residuals in ((down, mid), (None, None)):
            got = ort_pipe.unet(sample, t, context, *residuals)
            ref = torch_pipe.unet(sample, t, context, *residuals)
            assert (got - ref).abs().max().item() <= GRAPH_TOL


@pytest.mark.parametrize("kwargs", [
    dict(controlnet_conditioning_scale=[0.8, 1.2], control_guidance_start=[0.0, 0.5],
         control_guidance_end=[0.5, 1.0]),
    dict(image="photo", mask="mask", guess_mode=True),
], ids=["txt2img-scales-start-end", "inpaint-guess"])
def test_generation_matches_the_torch_backend(pipes, kwargs):
    torch_pipe, ort_pipe, _ = pipes
    rng = np.random.default_rng(0)
    kwargs = dict(kwargs)
    if kwargs.get("image") == "photo":
        kwargs["image"] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    if kwargs.get("mask") == "mask":
        kwargs["mask"] = np.zeros((16, 16), dtype=np.uint8)
        kwargs["mask"][4:12, 2:10] = 255
    call = dict(prompt="a red cube", negative_prompt="blurry", steps=4, seed=3, output="np",
                control_image=[control_picture(seed=11), control_picture(seed=12)], **kwargs)
    ref, got = torch_pipe(**call), ort_pipe(**call)
    assert got.images.shape == ref.images.shape == (1, 16, 16, 3)
    assert np.abs(got.images - ref.images).max() <= IMAGE_TOL


def test_a_second_load_reuses_the_exports(pipes, monkeypatch):
    _, _, root = pipes
    from sdrt.export import onnx as onnx_export

    monkeypatch.setenv("SDRT_CACHE", str(root / "cache"))
    monkeypatch.setattr(onnx_export, "_export_component", lambda *a, **k: pytest.fail("exported again"))
    pipe = sdrt.load(root / "sd1", device="cpu", backend="onnxruntime", controlnet=root / "cn2")
    assert len(pipe.controlnets) == 1
    exports = sorted(p.name.split("-")[0] for p in (root / "cache" / "onnx").iterdir() if p.is_dir())
    assert exports == ["controlnet", "controlnet", "sd1", "sd1"]  # two ControlNets, the model and unet_control
