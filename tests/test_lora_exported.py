"""LoRA on exported graphs: the onnxruntime backend takes fused LoRAs with no re-export (its session rebuilt with
the changed initializers overridden) and matches the torch backend within 2/255; the initializer map (shared
with TensorRT refit) finds every LoRA-able weight by value, transposed MatMul weights included."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import sdrt
from factories import save_pipeline
from lora_files import write_kohya, write_peft
from sdrt.export import onnx as onnx_export
from sdrt.export.initializer_map import initializer_map
from sdrt.lora.targets import TargetTable

IMAGE_TOL = 2 / 255
GEN = dict(prompt="a red cube", steps=3, seed=3, output="np")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_ort")
    reference = save_pipeline(root / "sd1", "sd1")
    write_kohya(root / "a.safetensors", reference, seed=1)
    write_peft(root / "b.safetensors", reference, seed=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SDRT_CACHE", str(root / "cache"))
        yield root, sdrt.load(root / "sd1", backend="torch"), sdrt.load(root / "sd1", backend="onnxruntime")


def test_every_lora_target_has_an_initializer(model):
    root, torch_pipe, _ = model
    export = onnx_export.export_onnx(_components(root))
    table = TargetTable(torch_pipe.unet, torch_pipe.text_encoder)
    for component in ("unet", "text_encoder"):
        targets = table.unique(component)
        slots = initializer_map(export.path(component), {t.module: t.weight for t in targets}, torch.float32)
        assert set(slots) == {t.module for t in targets}
        assert any(s.transposed for s in slots.values()) and any(s.name.startswith("onnx::") for s in slots.values())
        for t in targets:  # each slot gives back the initializer's array from the torch weight
            assert slots[t.module].value(t.weight).shape[0] == (t.weight.shape[1] if slots[t.module].transposed
                                                                else t.weight.shape[0])


def _components(root):
    from sdrt.components import load_components
    return load_components(root / "sd1")


def test_onnxruntime_with_two_loras_matches_torch_without_reexport(model, monkeypatch):
    root, torch_pipe, ort_pipe = model
    base = ort_pipe(**GEN).images
    monkeypatch.setattr(onnx_export, "_export_component", lambda *a, **k: pytest.fail("re-exported"))
    for pipe in (torch_pipe, ort_pipe):
        pipe.load_lora(root / "a.safetensors", scale=0.7)
        pipe.load_lora(root / "b.safetensors", scale=0.4)
    ref, got = torch_pipe(**GEN).images, ort_pipe(**GEN).images
    assert np.abs(got - base).max() > 10 * IMAGE_TOL  # the LoRAs reached the graphs
    assert np.abs(got - ref).max() <= IMAGE_TOL
    for pipe in (torch_pipe, ort_pipe):
        pipe.set_lora_scale("a", 0.2)
        pipe.unload_lora("b")
    assert np.abs(ort_pipe(**GEN).images - torch_pipe(**GEN).images).max() <= IMAGE_TOL
    ort_pipe.unload_lora()
    torch_pipe.unload_lora()
    assert np.array_equal(ort_pipe(**GEN).images, base)
