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


def test_torch_float32_candidate_is_a_second_run_judged_against_the_reference():
    report = parity.compare("random:tiny", "torch", dtype="float32", device="cpu", prompts=["a red cube"], steps=4)
    assert [r.component for r in report.rows] == list(parity.COMPONENTS)
    assert report.passed is True and not report.baseline_only, report.table()
    assert report.baseline == "the float32 reference"
    for row in report.rows:
        assert row.backend.max_abs == 0  # the same modules on the same inputs, rebuilt: reproduced exactly
        assert row.baseline.max_abs == 0  # so the limit is the float32 floor alone
    assert "PASS" in report.table() and report.to_dict()["passed"] is True


def test_torch_in_low_precision_is_reported_as_baseline_only():
    report = parity.compare("random:tiny", "torch", dtype="bfloat16", device="cpu", prompts=["a red cube"], steps=4)
    assert report.baseline_only and report.passed is None and report.to_dict()["passed"] is None
    assert all(r.passed is None for r in report.rows)
    image = report.rows[-1]
    assert 0 < image.baseline.max_abs < 0.2 and 25 < image.baseline.psnr < math.inf  # bf16's own error, measured
    assert "BASELINE ONLY" in report.table() and "PASS" not in report.table()


def _loads_recording_tf32(monkeypatch, other_weights_after: int = 0):
    """parity's model loads, noting the TF32 flags at each; loads after the first `other_weights_after`
    get other weights (seed 7), as a broken candidate would have."""
    seen = []
    real = parity._components

    def load(model, device):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        components = real(model, device)
        if other_weights_after and len(seen) > other_weights_after:
            components = parity.random_weights.components("tiny", device=device, seed=7)
        return components

    monkeypatch.setattr(parity, "_components", load)
    return seen


def test_a_torch_candidate_that_differs_from_the_reference_fails(monkeypatch):
    _loads_recording_tf32(monkeypatch, other_weights_after=1)  # the reference loads first
    report = parity.compare("random:tiny", "torch", dtype="float32", device="cpu", prompts=["a red cube"], steps=2)
    assert report.passed is False and "FAIL" in report.table()


def test_every_run_uses_the_references_matmul_policy(monkeypatch):
    seen = _loads_recording_tf32(monkeypatch)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # what a CUDA user may have set
    try:
        report = parity.compare("random:tiny", "torch", dtype="float32", device="cpu", prompts=["a"], steps=1)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)  # restored
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert len(seen) == 2 and set(seen) == {(False, False)}  # the reference and the candidate
    assert "TF32 off" in report.matmul_policy and report.matmul_policy in report.table()
    assert report.to_dict()["matmul_policy"] == report.matmul_policy


@pytest.mark.parametrize("kwargs, match", [(dict(backend="cuda-magic"), "backend"), (dict(steps=0), "steps"),
                                           (dict(seeds=[1, 2]), "seeds"), (dict(model="random:huge"), "random")])
def test_compare_rejects_bad_arguments(kwargs, match):
    args = dict(model="random:tiny", backend="torch", device="cpu", prompts=["a"], steps=2) | kwargs
    with pytest.raises(sdrt.InvalidInputError, match=match):
        parity.compare(args.pop("model"), args.pop("backend"), **args)
