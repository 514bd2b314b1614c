"""The export cache is keyed on the weights, never on a model's name: two in-memory models of one name
(`random tiny` seeds 0 and 7) each run their own weights through the onnxruntime backend.
Target: < 30 s on 2 CPU cores (two tiny exports)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from sdrt.export.onnx import default_export_dir
from sdrt.export.weights_digest import tensor_sha256, weights_digest
from sdrt.models import random_weights
from sdrt.pipeline import from_components


def test_digest_follows_the_weights_not_the_name():
    a, b = random_weights.components("tiny", seed=0), random_weights.components("tiny", seed=0)
    b.source = "somewhere else"
    assert weights_digest(a) == weights_digest(b, workers=1)  # same weights: same key, whatever the name
    assert weights_digest(a) != weights_digest(random_weights.components("tiny", seed=7))
    with torch.no_grad():
        b.unet.conv_out.bias[0] += 1e-3  # changed in place after loading (as a fused LoRA would)
    assert weights_digest(a) != weights_digest(b)
    c = random_weights.components("tiny", seed=0)
    c.unet.config = dataclasses.replace(c.unet.config, upcast_attention=True)  # same tensors, another graph
    assert weights_digest(a) != weights_digest(c)


def test_tensor_digest_reads_every_dtype_and_shape():
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert tensor_sha256(x) == tensor_sha256(x.clone()) != tensor_sha256(x.t())  # the values in order
    assert tensor_sha256(x.bfloat16()) != tensor_sha256(x.half())
    assert tensor_sha256(torch.tensor(1.0)) and tensor_sha256(torch.empty(0))


def test_models_of_one_name_never_share_an_export(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("SDRT_CACHE", str(tmp_path))
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 128, generator=g)
    for seed in (0, 7):
        reference = random_weights.components("tiny", seed=seed)
        assert reference.source == "random tiny"
        pipe = from_components(random_weights.components("tiny", seed=seed), backend="onnxruntime", device="cpu")
        with torch.no_grad():
            assert (pipe.unet(x, 500, ctx) - reference.unet(x, 500, ctx)).abs().max().item() <= 1e-4, seed
    exports = [p for p in (tmp_path / "onnx").iterdir() if p.is_dir()]  # beside them: their lock files
    assert len(exports) == 2 and default_export_dir(reference) in exports
