"""sdrt.kernels.attention against the torch reference, with flash-attention's tolerance rule.

Without CUDA the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), with
32 x 16 blocks so that L in {17, 64, 77} covers partial query and key blocks; SD 1.5's real shapes run
only on a GPU. Target: < 30 s on a 2-core CPU.
"""
import sys

import pytest
import torch

import sdrt.kernels
from sdrt.errors import BackendUnavailableError, InvalidInputError

pytest.importorskip("triton")
from sdrt.kernels.flash_attention import attention_reference  # noqa: E402
from sm90 import compile_for_sm90
from tolerance import assert_flash_rule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HEAD_DIMS = [40, 64, 80, 128, 160]


def _qkv(batch, heads, lq, lk, head_dim, dtype, seed=0):
    """q, k, v as the models make them: transposed views of [B, L, H, D] tensors."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, n, heads, head_dim, generator=g).to(dtype).to(DEVICE).transpose(1, 2)
               for n in (lq, lk, lk))
    return q, k, v


def _assert_flash_rule(out, q, k, v, scale=None):
    """torch's own error: plain attention in the inputs' dtype (scores and probabilities rounded to it)."""
    ref64 = attention_reference(q.double(), k.double(), v.double(), scale)
    assert_flash_rule(out, attention_reference(q, k, v, scale), ref64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("seq_len", [17, 64])
def test_self_attention(seq_len, head_dim, dtype):
    q, k, v = _qkv(1, 2, seq_len, seq_len, head_dim, dtype)
    out = sdrt.kernels.attention(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    _assert_flash_rule(out, q, k, v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_cross_attention(head_dim, dtype):
    q, k, v = _qkv(2, 1, 33, 77, head_dim, dtype, seed=1)
    _assert_flash_rule(sdrt.kernels.attention(q, k, v), q, k, v)


def test_cross_attention_154_keys_and_explicit_scale():
    q, k, v = _qkv(1, 2, 20, 154, 64, torch.float16, seed=2)
    _assert_flash_rule(sdrt.kernels.attention(q, k, v, scale=0.3), q, k, v, scale=0.3)


def test_output_layout_makes_head_merge_free():
    q, k, v = _qkv(2, 3, 17, 17, 40, torch.float16, seed=3)
    out = sdrt.kernels.attention(q, k, v)
    merged = out.transpose(1, 2)
    assert merged.is_contiguous()  # so .reshape(B, L, H * D) is a view
    assert merged.reshape(2, 17, 3 * 40).data_ptr() == out.data_ptr()


def test_contiguous_inputs_and_kernels_object():
    q, k, v = (t.contiguous() for t in _qkv(1, 2, 17, 17, 64, torch.float32, seed=4))
    a = sdrt.kernels.attention(q, k, v)
    b = sdrt.kernels.TritonKernels().attention(q, k, v, None)
    assert torch.equal(a, b)
    _assert_flash_rule(a, q, k, v)


def test_strides_not_multiple_of_16_bytes():
    # Rows 43 elements apart: the launcher must not promise the compiler 16-byte alignment.
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, n, 2, 43, generator=g).to(torch.float16).to(DEVICE)[..., :40].transpose(1, 2)
               for n in (17, 77, 77))
    _assert_flash_rule(sdrt.kernels.attention(q, k, v), q, k, v)


def test_kernels_object_sends_heads_wider_than_256_to_sdpa():
    # The VAE's mid-block attention: one 512-wide head; the kernel itself refuses it.
    q, k, v = _qkv(1, 1, 16, 16, 512, torch.float32, seed=7)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.equal(sdrt.kernels.TritonKernels().attention(q, k, v), expected)
    with pytest.raises(InvalidInputError, match="head dim must be in 1..256"):
        sdrt.kernels.attention(q, k, v)


def test_large_scores_do_not_overflow():
    # Scores of several hundred: exp without max subtraction would overflow fp32.
    q, k, v = _qkv(1, 1, 17, 17, 64, torch.float16, seed=5)
    q = q * 8
    _assert_flash_rule(sdrt.kernels.attention(q, k, v), q, k, v)


def test_bad_arguments_raise():
    q, k, v = _qkv(1, 2, 8, 8, 64, torch.float16)
    with pytest.raises(InvalidInputError, match="q: expected a 4-d tensor"):
        sdrt.kernels.attention(q[0], k, v)
    with pytest.raises(InvalidInputError, match="head dims must match"):
        sdrt.kernels.attention(q, k[..., :32], v)
    with pytest.raises(InvalidInputError, match="dtypes must match"):
        sdrt.kernels.attention(q, k.float(), v)
    with pytest.raises(InvalidInputError, match="dtype torch.int64 not supported"):
        sdrt.kernels.attention(q.long(), k.long(), v.long())
    with pytest.raises(InvalidInputError, match="sequence lengths must match"):
        sdrt.kernels.attention(q, k, v[:, :, :4])


def test_missing_triton_raises_backend_unavailable(monkeypatch):
    monkeypatch.delitem(sys.modules, "sdrt.kernels.flash_attention")
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` fail
    q, k, v = _qkv(1, 1, 4, 4, 16, torch.float32)
    with pytest.raises(BackendUnavailableError, match="need the `triton` package"):
        sdrt.kernels.attention(q, k, v)


def test_compiles_for_h100_with_pipelined_tensor_core_loads():
    # The interpreter never compiles: build PTX for sm_90 (no GPU needed) and check that head_dim 40 in
    # [B, L, H, D] views keeps async (pipelined) loads and wgmma, and that bf16 160 / fp32 80 compile.
    fp16_d40, bf16_d160, fp32_d80 = compile_for_sm90("attention")
    assert fp16_d40["head_dim"] == 40 and fp16_d40["cp_async"] > 0 and fp16_d40["wgmma"] > 0
    assert bf16_d160["wgmma"] > 0 and fp32_d80["cp_async"] > 0


# SD 1.5 at 512x512 with classifier-free guidance: batch 2, 8 heads, self-attention over 4096..64 tokens,
# cross-attention over 77 text tokens.
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: SD 1.5 shapes are too slow "
                                                          "for Triton's interpreter")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch, heads, lq, lk, head_dim", [
    (2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 8, 1024, 1024, 80), (2, 8, 1024, 77, 80),
    (2, 8, 256, 256, 160), (2, 8, 64, 64, 160), (2, 8, 64, 77, 160), (2, 8, 4096, 154, 64),
    (1, 2, 4096, 4096, 128), (1, 1, 16384, 16384, 64),  # fewer heads: the float64 reference is L^2 memory
])
def test_sd15_shapes_cuda(batch, heads, lq, lk, head_dim, dtype):
    q, k, v = _qkv(batch, heads, lq, lk, head_dim, dtype)
    _assert_flash_rule(sdrt.kernels.attention(q, k, v), q, k, v)

