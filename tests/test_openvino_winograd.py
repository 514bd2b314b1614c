"""Winograd F(4x4, 3x3) convolutions in the openvino backend (sdrt.backends.openvino_winograd): a rewritten
convolution equals the direct one to float32 rounding (1e-5 of the output's magnitude) at any height and width,
convolutions that are not 3x3/stride 1/padding 1, have few tiles or dynamic shapes stay direct. The pipeline with
rewritten layers: tests/test_openvino_backend.py."""
from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest
import torch
import torch.nn.functional as F

from sdrt.backends.openvino_winograd import MIN_TILES, rewrite_convolutions

REL_TOL = 1e-5  # of max |direct output|; direct float32 convolutions differ from each other by ~5e-7


def conv_model(shape, weight: np.ndarray, stride=1, pad=1, static=True):
    param = ops.parameter(shape if static else [-1, shape[1], -1, -1], np.float32)
    conv = ops.convolution(param, ops.constant(weight), [stride] * 2, [pad] * 2, [pad] * 2, [1, 1])
    return ov.Model([conv], [param])


def run(model, x: np.ndarray) -> np.ndarray:
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return np.array(compiled.create_infer_request().infer({0: x})[0])


@pytest.mark.parametrize("height,width", [(16, 16), (13, 18), (9, 31)])
def test_rewritten_convolution_equals_direct(height, width):
    rng = np.random.default_rng(height * width)
    x = rng.standard_normal((2, 32, height, width), dtype=np.float32)
    weight = (rng.standard_normal((48, 32, 3, 3)) / 17).astype(np.float32)
    model = conv_model(list(x.shape), weight)
    assert rewrite_convolutions(model) == 1
    assert [op.get_type_name() for op in model.get_ordered_ops()].count("Convolution") == 0
    got = run(model, x)
    ref = F.conv2d(torch.from_numpy(x).double(), torch.from_numpy(weight).double(), padding=1).numpy()
    assert got.shape == ref.shape == (2, 48, height, width)
    assert np.abs(got - ref).max() <= REL_TOL * np.abs(ref).max()


@pytest.mark.parametrize("case", ["stride 2", "1x1", "few tiles", "dynamic shape", "few channels"])
def test_other_convolutions_stay_direct(case):
    rng = np.random.default_rng(0)
    shape, cin, kernel, stride, pad, static = [2, 32, 16, 16], 32, 3, 1, 1, True
    if case == "stride 2":
        stride = 2
    elif case == "1x1":
        kernel, pad = 1, 0
    elif case == "few tiles":
        shape = [1, 32, 4 * 4, 4 * (MIN_TILES // 4 - 1)]  # MIN_TILES - 4 tiles
    elif case == "dynamic shape":
        static = False
    else:
        shape, cin = [2, 4, 16, 16], 4
    weight = rng.standard_normal((8, cin, kernel, kernel)).astype(np.float32)
    assert rewrite_convolutions(conv_model(shape, weight, stride, pad, static)) == 0
