"""Flash attention forward: softmax(Q K^T * scale) V without a mask, in the style of Triton's tutorial 06.

One program per (block of BLOCK_M queries, batch * head). It streams K and V in blocks of BLOCK_N keys
and keeps an online softmax in fp32 (running max m_i and sum l_i, base-2 exponentials with log2(e)
folded into the scale). Scores are fp32 dots of the input-dtype q and k (fp16/bf16 products are exact in
fp32), so the kernel already computes what `upcast_attention` asks for (see sdrt.kernels.TritonKernels). Head dims that are not powers of two (40, 80, 160) are padded to
BLOCK_D = next_power_of_2(head_dim) with masked loads; the last, partial key block (77 = 64 + 13) is
masked separately so the full blocks run without a key mask.

Every tensor is addressed through its own four strides, so the transposed view of a [B, L, H, D]
tensor goes in without a copy. The output is [B, H, Lq, D] as a transposed view of a contiguous
[B, Lq, H, D] buffer (as SDPA's flash backend returns it): `out.transpose(1, 2).reshape(B, Lq, H * D)`
is then free.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from sdrt.errors import InvalidInputError

from .interpreter_rounding import round_to_bf16
from .launch import check_runnable, is_interpreted

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256  # sdrt.kernels.MAX_KERNEL_HEAD_DIM: an fp32 [BLOCK_M, BLOCK_D] accumulator in registers
_LOG2_E = 1.4426950408889634


@triton.jit
def _attention_inner(
    acc, l_i, m_i, q, k_base, v_base, offs_d, mask_d, start, end, LK, qk_scale,
    stride_kn, stride_kd, stride_vn, stride_vd,
    BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, INTERPRETER_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt_mask = mask_d[:, None]
        v_mask = mask_d[None, :]
        if MASK_N:
            kt_mask = kt_mask & (offs_n < LK)[None, :]
            v_mask = v_mask & (offs_n < LK)[:, None]
        # kt: [BLOCK_D, BLOCK_N], v: [BLOCK_N, BLOCK_D]
        kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=kt_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=v_mask, other=0.0)
        p_dtype = v.dtype
        if INTERPRETER_BF16:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N] fp32, log2 units
        if MASK_N:
            qk = tl.where((offs_n < LK)[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        # P is rounded to the input dtype before the second matmul, as in every flash attention.
        if INTERPRETER_BF16:
            p = round_to_bf16(p)  # stays fp32, holding bf16 values
        else:
            p = p.to(p_dtype)
        acc = tl.dot(p, v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, qk_scale, HEADS, LQ, LK,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERPRETER_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HEADS).to(tl.int64)
    h = (pid_bh % HEADS).to(tl.int64)
    q_off = b * stride_qb + h * stride_qh
    k_off = b * stride_kb + h * stride_kh
    v_off = b * stride_vb + h * stride_vh
    o_off = b * stride_ob + h * stride_oh
    if ALIGN > 1:
        # The launcher checked that every stride but d's is a multiple of ALIGN elements (16 bytes). Triton
        # only learns divisibility by 16 elements on its own, so without these hints a stride of 40
        # (head_dim 40) would turn every load into scalar, unpipelined accesses. `s // A * A` is how a
        # scalar argument's divisibility reaches the compiler (tl.multiple_of on an argument does not).
        q_off = tl.multiple_of(q_off, ALIGN)
        k_off = tl.multiple_of(k_off, ALIGN)
        v_off = tl.multiple_of(v_off, ALIGN)
        o_off = tl.multiple_of(o_off, ALIGN)
        stride_qm = stride_qm // ALIGN * ALIGN
        stride_kn = stride_kn // ALIGN * ALIGN
        stride_vn = stride_vn // ALIGN * ALIGN
        stride_om = stride_om // ALIGN * ALIGN
    q_base = q_ptr + q_off
    k_base = k_ptr + k_off
    v_base = v_ptr + v_off
    o_base = o_ptr + o_off

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < LQ
    mask_d = offs_d < HEAD_DIM
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    if INTERPRETER_BF16:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lk_full = (LK // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attention_inner(
        acc, l_i, m_i, q, k_base, v_base, offs_d, mask_d, 0, lk_full, LK, qk_scale,
        stride_kn, stride_kd, stride_vn, stride_vd,
        BLOCK_N=BLOCK_N, MASK_N=False, INTERPRETER_BF16=INTERPRETER_BF16, DOT_PRECISION=DOT_PRECISION)
    acc, l_i, m_i = _attention_inner(  # the partial last key block, if any
        acc, l_i, m_i, q, k_base, v_base, offs_d, mask_d, lk_full, LK, LK, qk_scale,
        stride_kn, stride_kd, stride_vn, stride_vd,
        BLOCK_N=BLOCK_N, MASK_N=True, INTERPRETER_BF16=INTERPRETER_BF16, DOT_PRECISION=DOT_PRECISION)
    out = acc / l_i[:, None]
    if INTERPRETER_BF16:
        out = round_to_bf16(out)
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


# ------------------------------------------------------------------------------------------ launcher
# On CUDA the block shape is tuned once per (LQ, LK, HEAD_DIM, dtype) on first use. That first call
# benchmarks, which cannot happen inside CUDA graph capture: run every shape once before capturing. A
# shape first seen during capture gets a fixed config, untuned, for the rest of the process.
# Configs that do not fit in shared memory (large BLOCK_D) are skipped by the autotuner.
_CUDA_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
    for bm, bn, warps, stages in [
        (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4),
        (64, 64, 4, 3), (64, 32, 4, 4), (64, 128, 4, 3), (128, 64, 4, 4),
    ]
]


def _no_tuning_while_capturing(configs, named_args, **kwargs):
    if not torch.cuda.is_current_stream_capturing():
        return configs
    # 128 x 64 blocks fit in shared memory up to BLOCK_D 128; 64 x 32 ones up to 256.
    block_m, block_n = (128, 64) if kwargs["BLOCK_D"] <= 128 else (64, 32)
    return [next(c for c in configs if c.kwargs["BLOCK_M"] == block_m and c.kwargs["BLOCK_N"] == block_n)]


_attention_kernel_tuned = triton.autotune(configs=_CUDA_CONFIGS, key=["LQ", "LK", "HEAD_DIM"],
                                          prune_configs_by={"early_config_prune": _no_tuning_while_capturing},
                                          )(_attention_kernel)

# The interpreter runs programs one after another: small blocks here only exercise the tails and loops.
_INTERPRETER_BLOCK_M, _INTERPRETER_BLOCK_N = 32, 16


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for q [B, H, Lq, D], k/v [B, H, Lk, D], any strides; scale defaults to D**-0.5.

    Returns [B, H, Lq, D], a transposed view of a contiguous [B, Lq, H, D] buffer.
    """
    _check_inputs(q, k, v, scale)
    check_runnable(_attention_kernel, q, k, v)
    batch, heads, lq, head_dim = q.shape
    lk = k.shape[2]
    out = torch.empty((batch, lq, heads, head_dim), device=q.device, dtype=q.dtype).transpose(1, 2)
    if out.numel() == 0:
        return out
    scale = head_dim ** -0.5 if scale is None else float(scale)
    # Under the interpreter, tl.dot multiplies bf16 bit patterns as integers and casts to bf16 truncate:
    # there the kernel runs its dots on fp32 copies (bf16 products are exact in fp32, as in a bf16 MMA
    # with fp32 accumulation) and rounds to bf16 explicitly.
    interpreter_bf16 = q.dtype == torch.bfloat16 and is_interpreted(_attention_kernel)
    dot_precision = "ieee" if (q.dtype == torch.float32 or interpreter_bf16) else None  # None: native fp16/bf16 MMA
    args = (q, k, v, out, scale * _LOG2_E, heads, lq, lk, *q.stride(), *k.stride(), *v.stride(), *out.stride())
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                INTERPRETER_BF16=interpreter_bf16, DOT_PRECISION=dot_precision,
                ALIGN=_alignment_hint(q.element_size(), q, k, v, out))
    if is_interpreted(_attention_kernel):
        block_m, block_n = _INTERPRETER_BLOCK_M, _INTERPRETER_BLOCK_N
        _attention_kernel[(triton.cdiv(lq, block_m), batch * heads)](*args, BLOCK_M=block_m, BLOCK_N=block_n, **meta)
    else:
        grid = lambda config: (triton.cdiv(lq, config["BLOCK_M"]), batch * heads)  # noqa: E731
        _attention_kernel_tuned[grid](*args, **meta)
    return out


def _alignment_hint(element_size: int, *tensors: torch.Tensor) -> int:
    """16 bytes in elements if every stride but the last (head dim) of every tensor is a multiple of it, else 1."""
    align = 16 // element_size
    strides = [s for t in tensors for s in t.stride()[:3]]
    return align if all(s % align == 0 for s in strides) else 1


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float]) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise InvalidInputError(f"{name}: expected a 4-d tensor [B, H, L, D], got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise InvalidInputError(f"{name}: dtype {t.dtype} not supported (float16, bfloat16, float32)")
    if not (q.dtype == k.dtype == v.dtype):
        raise InvalidInputError(f"q, k, v: dtypes must match, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        raise InvalidInputError(f"q, k, v: batch and head sizes must match, got shapes "
                                f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[2] != v.shape[2]:
        raise InvalidInputError(f"k, v: sequence lengths must match, got {k.shape[2]} and {v.shape[2]}")
    if not (q.shape[3] == k.shape[3] == v.shape[3]):
        raise InvalidInputError(f"q, k, v: head dims must match, got {q.shape[3]}, {k.shape[3]}, {v.shape[3]}")
    if not 1 <= q.shape[3] <= _MAX_HEAD_DIM:
        raise InvalidInputError(f"q: head dim must be in 1..{_MAX_HEAD_DIM}, got {q.shape[3]}")
    if k.shape[2] == 0 and q.shape[2] > 0:
        raise InvalidInputError("k: at least one key is needed (got kv_len 0)")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise InvalidInputError(f"scale: must be a finite float or None, got {scale!r}")


# ------------------------------------------------------------------------------------------ reference
def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        scale: Optional[float] = None) -> torch.Tensor:
    """Plain attention in the inputs' dtype (scores and probabilities rounded to it, as flash-attention's
    tests do for "torch's own error in that dtype")."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    return torch.matmul(torch.softmax(scores, dim=-1), v)
