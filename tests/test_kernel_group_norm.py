"""sdrt.kernels.group_norm against the torch reference, with flash-attention's tolerance rule.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so
the shapes are tiny; SD 1.5's real shapes run only on a GPU. Target: < 40 s on a 2-core CPU.
"""

import pytest
import torch

import sdrt.kernels
from sdrt.errors import InvalidInputError

pytest.importorskip("triton")
from sdrt.kernels.group_norm_silu import _group_norm, group_norm_reference  # noqa: E402
from sm90 import compile_for_sm90
from tolerance import assert_flash_rule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(shape, dtype, channels_last, mean=0.0, std=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (mean + std * torch.randn(shape, generator=g)).to(dtype)
    c = shape[1]
    weight = (1 + 0.5 * torch.randn(c, generator=g)).to(dtype)
    bias = (0.5 * torch.randn(c, generator=g)).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE)


def _assert_flash_rule(out, x, num_groups, weight, bias, eps, silu):
    ref64 = group_norm_reference(x.double(), num_groups, weight.double(), bias.double(), eps, silu)
    assert_flash_rule(out, group_norm_reference(x, num_groups, weight, bias, eps, silu), ref64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape, groups", [((2, 32, 9, 9), 8), ((1, 12, 7, 5), 4), ((2, 20, 8, 8), 2)],
                         ids=["cpg4", "cpg3-odd", "cpg10"])
@pytest.mark.parametrize("silu", [False, True], ids=["gn", "gn-silu"])
def test_matches_reference(shape, groups, channels_last, dtype, silu):
    x, weight, bias = _inputs(shape, dtype, channels_last)
    out = sdrt.kernels.group_norm(x, groups, weight, bias, eps=1e-5, silu=silu)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    _assert_flash_rule(out, x, groups, weight, bias, 1e-5, silu)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("block_hw, splits", [(4, 3), (2, 5), (16, 2)])
def test_chunked_and_split_reduction(channels_last, block_hw, splits):
    # Several tiles per split, a partial last tile and a merge of per-split statistics.
    x, weight, bias = _inputs((2, 24, 7, 9), torch.float16, channels_last, seed=1)
    out = _group_norm(x, 6, weight, bias, 1e-6, True, block_hw=block_hw, splits=splits)
    _assert_flash_rule(out, x, 6, weight, bias, 1e-6, True)


@pytest.mark.parametrize("dtype, mean, std", [(torch.float16, 3000.0, 20.0), (torch.float32, 1e4, 1.0)],
                         ids=["fp16", "fp32"])
def test_large_mean_is_stable(dtype, mean, std):
    # E[x^2] - E[x]^2 in fp32 loses everything here (mean^2 / var = 2e4 and 1e8); centered sums do not.
    x, weight, bias = _inputs((1, 16, 16, 16), dtype, True, mean=mean, std=std, seed=2)
    out = _group_norm(x, 4, weight, bias, 1e-5, False, block_hw=32, splits=3)
    _assert_flash_rule(out, x, 4, weight, bias, 1e-5, False)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(2, 8, 5, 1), (2, 8, 1, 5), (1, 8, 1, 1)], ids=["w1", "h1", "hw1"])
def test_unit_spatial_dims(shape, channels_last):
    x, weight, bias = _inputs(shape, torch.float32, channels_last, seed=4)
    out = sdrt.kernels.group_norm(x, 4, weight, bias, silu=True)
    _assert_flash_rule(out, x, 4, weight, bias, 1e-5, True)


def test_without_affine_and_strided_input():
    x, _, _ = _inputs((2, 8, 6, 10), torch.float32, False, seed=3)
    x = x.transpose(2, 3)  # neither NCHW- nor NHWC-contiguous: copied, then normalized
    out = sdrt.kernels.group_norm(x, 2, None, None)
    torch.testing.assert_close(out, torch.nn.functional.group_norm(x, 2), rtol=0, atol=1e-5)


def test_triton_kernels_object_matches_function():
    x, weight, bias = _inputs((1, 8, 4, 4), torch.float32, True)
    a = sdrt.kernels.TritonKernels().group_norm(x, 4, weight, bias, 1e-5, True)
    b = sdrt.kernels.group_norm(x, 4, weight, bias, eps=1e-5, silu=True)
    assert torch.equal(a, b)


@pytest.mark.parametrize("args, match", [
    (((2, 8, 4), 2), "x: expected a 4-d tensor"),
    (((1, 10, 4, 4), 4), "num_groups: must be a positive int dividing the 10 channels"),
    (((1, 8, 4, 4), 0), "num_groups"),
])
def test_bad_arguments_raise(args, match):
    shape, groups = args
    x = torch.zeros(shape, device=DEVICE)
    c = shape[1]
    with pytest.raises(InvalidInputError, match=match):
        sdrt.kernels.group_norm(x, groups, torch.ones(c, device=DEVICE), torch.zeros(c, device=DEVICE))


def test_bad_weight_and_dtype_raise():
    x = torch.zeros(1, 8, 4, 4, device=DEVICE)
    with pytest.raises(InvalidInputError, match=r"weight: expected shape \(8,\)"):
        sdrt.kernels.group_norm(x, 2, torch.ones(4, device=DEVICE), None)
    with pytest.raises(InvalidInputError, match="x: dtype torch.int32 not supported"):
        sdrt.kernels.group_norm(x.int(), 2, None, None)


def test_compiles_for_h100():
    # The interpreter never compiles: build PTX for sm_90 (no GPU needed) for the channels-last fp16 case.
    stats, apply = compile_for_sm90("group_norm")
    assert stats["kernel"] == "_group_norm_stats_kernel" and apply["kernel"] == "_group_norm_apply_kernel"


# SD 1.5 at 512x512 with classifier-free guidance (batch 2), fp16 channels-last, as the U-Net and VAE run.
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: SD 1.5 shapes are too slow "
                                                          "for Triton's interpreter")
@pytest.mark.parametrize("shape", [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 2560, 8, 8),
                                   (2, 960, 64, 64), (1, 128, 512, 512), (1, 512, 64, 64)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_sd15_shapes_cuda(shape, channels_last):
    x, weight, bias = _inputs(shape, torch.float16, channels_last)
    out = sdrt.kernels.group_norm(x, 32, weight, bias, eps=1e-6, silu=True)
    _assert_flash_rule(out, x, 32, weight, bias, 1e-6, True)
