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

import numpy as np

# F(4x4, 3x3) with interpolation points 0, +-1, +-2, infinity: B^T [6, 6], G [6, 3], A^T [4, 6]
_BT = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64)
_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64)
_AT = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], np.float64)
_ROW_FILTERS = _BT.reshape(6, 1, 6, 1).astype(np.float32)  # filter a over 6 rows: sum_p BT[a, p] d[p, :]
_COLUMN_FILTERS = _BT.reshape(6, 1, 1, 6).astype(np.float32)
_OUTPUT_TRANSFORM = np.kron(_AT, _AT).astype(np.float32)  # row i*4+j: output pixel (i, j) of a tile

MIN_TILES = 32  # N x ceil(H/4) x ceil(W/4) below which a layer keeps its direct convolution
MIN_CHANNELS = 32  # a convolution over fewer input channels (conv_in's 4) is cheap and stays direct


def transformed_weights(weight: np.ndarray) -> np.ndarray:
    """[Cout, Cin, 3, 3] -> [36, 1, Cout, Cin]: G g G^T for every channel pair, in float64."""
    cout, cin = weight.shape[:2]
    u = np.einsum("ik,ockl,jl->ijoc", _G, weight.astype(np.float64), _G)
    return u.reshape(36, 1, cout, cin).astype(np.float32)


def rewrite_convolutions(model) -> int:
    """Replace the eligible convolutions of `model` (an openvino.Model with static input shapes) in place;
    returns how many were rewritten."""
    rewritten = 0
    for node in model.get_ordered_ops():
        weight = _eligible_weight(node)
        if weight is not None:
            node.output(0).replace(_winograd(node.input_value(0), weight))
            rewritten += 1
    if rewritten:
        model.validate_nodes_and_infer_types()
    return rewritten


def _eligible_weight(node):
    """The constant [Cout, Cin, 3, 3] weight of a convolution worth rewriting, else None."""
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
    if cin < MIN_CHANNELS or n * -(-h // 4) * -(-w // 4) < MIN_TILES:
        return None
    weight = source.get_data()
    return weight if weight.shape[1:] == (cin, 3, 3) else None


def _winograd(x, weight: np.ndarray):
    import openvino.opset13 as ops

    def ints(values):
        return ops.constant(np.array(values, np.int64))

    cout, cin = weight.shape[:2]
    n, _, h, w = (d.get_length() for d in x.get_partial_shape())
    th, tw = -(-h // 4), -(-w // 4)
    rows = ops.constant(np.ascontiguousarray(np.broadcast_to(_ROW_FILTERS, (cin, 6, 1, 6, 1))))
    columns = ops.constant(np.ascontiguousarray(np.broadcast_to(_COLUMN_FILTERS, (cin * 6, 6, 1, 1, 6))))
    tiles = ops.group_convolution(x, rows, [4, 1], [1, 1], [4, 4], [1, 1])                    # N, Cin*6, th, W+5
    tiles = ops.group_convolution(tiles, columns, [1, 4], [0, 0], [0, 0], [1, 1])             # N, Cin*36, th, tw
    v = ops.transpose(ops.reshape(tiles, ints([n, cin, 36, th * tw]), False), ints([2, 0, 1, 3]))  # 36, N, Cin, P
    m = ops.matmul(ops.constant(transformed_weights(weight)), v, False, False)                 # 36, N, Cout, P
    y = ops.matmul(ops.constant(_OUTPUT_TRANSFORM), ops.reshape(m, ints([36, -1]), False), False, False)
    y = ops.transpose(ops.reshape(y, ints([16, n, cout, th * tw]), False), ints([1, 2, 0, 3]))  # N, Cout, 16, P
    y = ops.depth_to_space(ops.reshape(y, ints([n, cout * 16, th, tw]), False), "depth_first", 4)
    if (th * 4, tw * 4) != (h, w):
        y = ops.slice(y, ints([0, 0]), ints([h, w]), ints([1, 1]), ints([2, 3]))
    return y.output(0)
