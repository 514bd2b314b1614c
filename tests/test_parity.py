"""sdrt.parity: distances, the pass rule, and compare() on the tiny random model (CPU, 4 steps, 16x16).
Target: < 20 s on 2 CPU cores."""
from __future__ import annotations

import math

import pytest
import torch

import sdrt
from sdrt import parity


def test_distance_of_known_tensors():
    ref = torch.tensor([1.0, 0.0, 0.0, 0.0])
    d = parity.distance(torch.tensor([1.0, 0.5, 0.0, 0.0]), ref, psnr=True)
    assert d.max_abs == 0.5
    assert d.cosine == pytest.approx(1 / math.sqrt(1.25))
    assert d.psnr == pytest.approx(-10 * math.log10(0.25 / 4))
    assert parity.distance(ref, ref, psnr=True).psnr == math.inf


def test_pass_rule_is_twice_the_baseline_error():
    base = parity.Distance(max_abs=0.01, cosine=0.999, psnr=40.0)
    ok = parity.judge("image", parity.Distance(0.019, 0.998, 34.5), base, ref_scale=1.0)
    assert ok.passed and ok.max_abs_limit == pytest.approx(0.02 + 1e-4) and ok.psnr_limit == pytest.approx(33.98, abs=0.01)
    assert not parity.judge("image", parity.Distance(0.021, 0.999, 40.0), base, 1.0).passed  # max abs
    assert not parity.judge("image", parity.Distance(0.01, 0.9975, 40.0), base, 1.0).passed  # cosine
    assert not parity.judge("image", parity.Distance(0.01, 0.999, 33.0), base, 1.0).passed   # PSNR


def test_float32_backend_only_gets_the_summation_order_floor():
    exact = parity.Distance(0.0, 1.0, math.inf)
    row = parity.judge("unet", parity.Distance(3e-4, 1.0), parity.Distance(0.0, 1.0), ref_scale=2.0)
    assert not row.passed and row.max_abs_limit == pytest.approx(2e-4)
    assert parity.judge("image", parity.Distance(0.0, 1.0, 80.0), exact, 1.0).psnr_limit == pytest.approx(53.98, abs=0.01)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compare_torch_backend_on_the_tiny_model_passes(dtype):
    report = parity.compare("random:tiny", "torch", dtype=dtype, device="cpu", prompts=["a red cube"], steps=4)
    assert [r.component for r in report.rows] == list(parity.COMPONENTS)
    assert report.passed, report.table()
    image = report.rows[-1]
    if dtype == "float32":
        assert all(r.backend.max_abs == 0 for r in report.rows)  # the same modules on the same inputs
    else:
        assert 0 < image.backend.max_abs < 0.2 and 25 < image.backend.psnr < math.inf
    assert "PASS" in report.table() and report.to_dict()["passed"]


@pytest.mark.parametrize("kwargs, match", [(dict(backend="cuda-magic"), "backend"), (dict(steps=0), "steps"),
                                           (dict(seeds=[1, 2]), "seeds"), (dict(model="random:huge"), "random")])
def test_compare_rejects_bad_arguments(kwargs, match):
    args = dict(model="random:tiny", backend="torch", device="cpu", prompts=["a"], steps=2) | kwargs
    with pytest.raises(sdrt.InvalidInputError, match=match):
        parity.compare(args.pop("model"), args.pop("backend"), **args)
