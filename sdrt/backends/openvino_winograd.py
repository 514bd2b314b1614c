"""Winograd F(4x4, 3x3) convolutions for an OpenVINO model with static shapes (the openvino backend, CPU).

Why: on a CPU the fp32 U-Net runs at the machine's sgemm peak (2-core AMD EPYC: torch's 4096^3 sgemm 180 GFLOP/s,
OpenVINO's SD 1.5 U-Net about 190), and 3x3 convolutions are 55% of its FLOPs. Winograd's F(4x4, 3x3) (Lavin
and Gray, "Fast Algorithms for Convolutional Neural Networks", 2015) computes each 4x4 output tile of a 3x3
convolution with 36 multiplications per input/output channel pair instead of 144, as 36 matrix products.

Each eligible `Convolution` (constant [Cout, Cin, 3, 3] weights, stride 1, dilation 1, padding 1) becomes:
  - input transform B^T d B: two grouped convolutions with B^T's rows as filters, over rows (6x1, stride 4)
    then columns (1x6, stride 4), padded 1 before and 4 after (so ceil(H/4) tiles cover any height; the
    surplus rows are cropped at the end);
  - 36 matrix products of the transformed tiles [N*tiles, Cin] with the transformed weights G g G^T [Cin, Cout]
    (computed here in float64, stored float32: 4x the weight memory of those layers);
  - output transform A^T m A (a [16, 36] matrix product), DepthToSpace(4), and a crop to H x W.
Error: float32 rounding through the transforms, about 1e-5 of the output's magnitude per layer (direct
convolution about 5e-7); the whole SD 1.5-config U-Net in OpenVINO (64x64 latents) differs from sdrt torch by
2.6e-5 max abs on outputs of magnitude 2.5 (direct convolutions: 8e-6), inside sdrt's float32 parity floor
(1e-4 of the reference's magnitude).

Only layers with enough tiles are rewritten: with few tiles the products are too small to pay for reading 4x
the weights (measured in OpenVINO on the 2-core EPYC, batch 2, 1280 channels: 16x16 input 1.9x faster than the
direct convolution, 8x8 input 0.64x; F(2x2, 3x3), with 1.8x the weights, was no better at 8x8: 0.86x-1.21x).
Shapes must be static, which is why the backend compiles one model per input shape.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Transform:
    """F(m x m, 3x3): input tiles of (m+2)^2 pixels at stride m, m x m outputs each."""
    m: int
    bt: np.ndarray  # [m+2, m+2] input transform B^T
    g: np.ndarray   # [m+2, 3] weight transform G
    at: np.ndarray  # [m, m+2] output transform A^T

    @property
    def points(self) -> int:  # (m+2)^2 matrix products
        return (self.m + 2) ** 2


# F(4x4, 3x3) with interpolation points 0, +-1, +-2, infinity
F4 = Transform(4, np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                            [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64),
               np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64),
               np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
                        np.float64))

MIN_TILES = 32  # N x ceil(H/4) x ceil(W/4) below which a layer keeps its direct convolution
MIN_CHANNELS = 32  # a convolution over fewer input channels (conv_in's 4) is cheap and stays direct


def transformed_weights(weight: np.ndarray, f: Transform) -> np.ndarray:
    """[Cout, Cin, 3, 3] -> [points, 1, Cout, Cin]: G g G^T for every channel pair, in float64."""
    cout, cin = weight.shape[:2]
    u = np.einsum("ik,ockl,jl->ijoc", f.g, weight.astype(np.float64), f.g)
    return u.reshape(f.points, 1, cout, cin).astype(np.float32)


def rewrite_convolutions(model) -> int:
    """Replace the eligible convolutions of `model` (an openvino.Model with static input shapes) in place;
    returns how many were rewritten."""
    rewritten = 0
    for node in model.get_ordered_ops():
        chosen = _eligible(node)
        if chosen is not None:
            node.output(0).replace(_winograd(node.input_value(0), *chosen))
            rewritten += 1
    if rewritten:
        model.validate_nodes_and_infer_types()
    return rewritten


def transform_for(n: int, cin: int, h: int, w: int):
    """The transform for a [n, cin, h, w] input, or None for a direct convolution."""
    if cin < MIN_CHANNELS or n * -(-h // F4.m) * -(-w // F4.m) < MIN_TILES:
        return None
    return F4


def _eligible(node):
    if node.get_type_name() != "Convolution":
        return None
    source = node.input_value(1).get_node()
    if source.get_type_name() != "Constant":
        return None
    attrs = node.get_attributes()
    if (attrs["strides"] != [1, 1] or attrs["dilations"] != [1, 1] or attrs["pads_begin"] != [1, 1]
            or attrs["pads_end"] != [1, 1] or attrs.get("auto_pad", "explicit") not in ("explicit", "notset")):
        return None
    shape = node.input(0).get_partial_shape()
    if not shape.is_static:
        return None
    n, cin, h, w = (d.get_length() for d in shape)
    weight = source.get_data()
    f = transform_for(n, cin, h, w) if weight.shape[1:] == (cin, 3, 3) else None
    return None if f is None else (weight, f)


def _winograd(x, weight: np.ndarray, f: Transform):
    import openvino.opset13 as ops

    def ints(values):
        return ops.constant(np.array(values, np.int64))

    cout, cin = weight.shape[:2]
    n, _, h, w = (d.get_length() for d in x.get_partial_shape())
    m, a, p = f.m, f.m + 2, f.points
    th, tw = -(-h // m), -(-w // m)
    # the input transform B^T d B as two grouped convolutions: over rows (stride m), then over columns
    rows = np.broadcast_to(f.bt.reshape(a, 1, a, 1), (cin, a, 1, a, 1)).astype(np.float32)
    columns = np.broadcast_to(f.bt.reshape(a, 1, 1, a), (cin * a, a, 1, 1, a)).astype(np.float32)
    tiles = ops.group_convolution(x, ops.constant(rows), [m, 1], [1, 1], [m, m], [1, 1])       # N, Cin*a, th, W+m+1
    tiles = ops.group_convolution(tiles, ops.constant(columns), [1, m], [0, 0], [0, 0], [1, 1])  # N, Cin*p, th, tw
    v = ops.transpose(ops.reshape(tiles, ints([n, cin, p, th * tw]), False), ints([2, 0, 1, 3]))  # p, N, Cin, P
    u = ops.matmul(ops.constant(transformed_weights(weight, f)), v, False, False)               # p, N, Cout, P
    y = ops.matmul(ops.constant(np.kron(f.at, f.at).astype(np.float32)), ops.reshape(u, ints([p, -1]), False),
                   False, False)                                                                 # m*m, N*Cout*P
    y = ops.transpose(ops.reshape(y, ints([m * m, n, cout, th * tw]), False), ints([1, 2, 0, 3]))  # N, Cout, m*m, P
    y = ops.depth_to_space(ops.reshape(y, ints([n, cout * m * m, th, tw]), False), "depth_first", m)
    if (th * m, tw * m) != (h, w):
        y = ops.slice(y, ints([0, 0]), ints([h, w]), ints([1, 1]), ints([2, 3]))
    return y.output(0)
