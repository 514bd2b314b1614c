"""GroupNorm with optional fused SiLU, for NCHW and channels-last (NHWC) inputs.

Two kernels, each over a grid of (n * group, split), where a split is a run of pixels of one group:
  1. `_group_norm_stats_kernel` reduces its split to (count, mean, M2) in fp32. Inside the split it
     folds chunk after chunk with Chan et al.'s parallel update, and each chunk's M2 is a sum of squares
     around the chunk's own mean, so there is no E[x^2] - E[x]^2 cancellation even for activations
     whose mean is large against their spread.
  2. `_group_norm_apply_kernel` merges the group's splits the same way, then writes
     silu?((x - mean) * rstd * weight + bias) for its split, in the input's dtype and memory format.
Splitting a group over several programs keeps the GPU busy when N * groups is small (SD: 2 * 32).

Layouts: x is addressed as [N, C, H*W] with strides (stride_n, stride_c, stride_hw). Both NCHW and
NHWC contiguous tensors flatten H, W that way; a channels-last group is a run of C/G contiguous
channels at every pixel, an NCHW group is C/G contiguous planes.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sdrt.errors import InvalidInputError

from .interpreter_rounding import round_to_bf16
from .launch import check_runnable, is_interpreted

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _group_norm_stats_kernel(
    x_ptr, partial_ptr,  # partial: [N * G, SPLITS, 3] fp32 (count, mean, M2)
    HW, HW_PER_SPLIT, SPLITS, GROUPS, CHANNELS_PER_GROUP,
    stride_n, stride_c, stride_hw,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    row = tl.program_id(0)  # n * GROUPS + g
    split = tl.program_id(1)
    n = row // GROUPS
    g = row % GROUPS
    base = x_ptr + n.to(tl.int64) * stride_n + (g * CHANNELS_PER_GROUP).to(tl.int64) * stride_c
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < CHANNELS_PER_GROUP
    hw_start = split * HW_PER_SPLIT
    hw_end = tl.minimum(hw_start + HW_PER_SPLIT, HW)

    count = tl.zeros([], dtype=tl.float32)
    mean = tl.zeros([], dtype=tl.float32)
    m2 = tl.zeros([], dtype=tl.float32)
    for hw0 in range(hw_start, hw_end, BLOCK_HW):
        offs_hw = hw0 + tl.arange(0, BLOCK_HW)
        mask = (offs_hw < hw_end)[:, None] & mask_c[None, :]
        ptrs = base + offs_hw[:, None].to(tl.int64) * stride_hw + offs_c[None, :] * stride_c
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_HW, BLOCK_C]
        chunk_count = (tl.minimum(hw_end - hw0, BLOCK_HW) * CHANNELS_PER_GROUP).to(tl.float32)
        chunk_mean = tl.sum(tl.sum(x, axis=1), axis=0) / chunk_count
        centered = tl.where(mask, x - chunk_mean, 0.0)
        chunk_m2 = tl.sum(tl.sum(centered * centered, axis=1), axis=0)
        # Chan et al.: merge (count, mean, m2) with the chunk's statistics.
        total = count + chunk_count
        delta = chunk_mean - mean
        mean += delta * (chunk_count / total)
        m2 += chunk_m2 + delta * delta * (count * chunk_count / total)
        count = total

    out = partial_ptr + (row * SPLITS + split) * 3
    tl.store(out + 0, count)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@triton.jit
def _group_norm_apply_kernel(
    x_ptr, y_ptr, weight_ptr, bias_ptr, partial_ptr,
    HW, HW_PER_SPLIT, SPLITS, GROUPS, CHANNELS_PER_GROUP, eps,
    stride_n, stride_c, stride_hw,  # shared by x and y: y is allocated in x's memory format
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, INTERPRETER_BF16: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    n = row // GROUPS
    g = row % GROUPS

    # Merge the group's per-split statistics: M2 = sum(M2_s + count_s * (mean_s - mean)^2).
    offs_s = tl.arange(0, BLOCK_SPLITS)
    mask_s = offs_s < SPLITS
    partial = partial_ptr + (row * SPLITS + offs_s) * 3
    counts = tl.load(partial + 0, mask=mask_s, other=0.0)
    means = tl.load(partial + 1, mask=mask_s, other=0.0)
    m2s = tl.load(partial + 2, mask=mask_s, other=0.0)
    total = tl.sum(counts, axis=0)
    mean = tl.sum(counts * means, axis=0) / total
    delta = tl.where(mask_s, means - mean, 0.0)
    m2 = tl.sum(m2s + counts * delta * delta, axis=0)
    rstd = 1.0 / tl.sqrt(m2 / total + eps)

    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < CHANNELS_PER_GROUP
    channel = g * CHANNELS_PER_GROUP + offs_c
    scale = tl.full([BLOCK_C], 1.0, tl.float32) * rstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + channel, mask=mask_c, other=0.0).to(tl.float32)
    shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        shift = tl.load(bias_ptr + channel, mask=mask_c, other=0.0).to(tl.float32)

    offset = n.to(tl.int64) * stride_n + (g * CHANNELS_PER_GROUP).to(tl.int64) * stride_c
    hw_start = split * HW_PER_SPLIT
    hw_end = tl.minimum(hw_start + HW_PER_SPLIT, HW)
    for hw0 in range(hw_start, hw_end, BLOCK_HW):
        offs_hw = hw0 + tl.arange(0, BLOCK_HW)
        mask = (offs_hw < hw_end)[:, None] & mask_c[None, :]
        offs = offset + offs_hw[:, None].to(tl.int64) * stride_hw + offs_c[None, :] * stride_c
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # (x - mean) * scale rather than x * scale + (shift - mean * scale): no cancellation for large means.
        y = (x - mean) * scale[None, :] + shift[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        if INTERPRETER_BF16:
            y = round_to_bf16(y)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------ launcher
def _launch_config(batch_groups: int, channels_per_group: int, hw: int, device: torch.device):
    """(BLOCK_C, BLOCK_HW, splits, num_warps) for a problem of batch_groups groups of C/G x HW elements."""
    block_c = triton.next_power_of_2(channels_per_group)
    if device.type != "cuda":
        # The interpreter runs programs one after another: few programs with big tiles are fastest.
        return block_c, max(1, min(triton.next_power_of_2(hw), 16384 // block_c)), 1, 4
    tile = 4096
    block_hw = max(1, min(triton.next_power_of_2(hw), tile // block_c))
    # Aim for a few programs per SM, but keep at least two tiles of work per split.
    target_programs = 4 * _multiprocessor_count(device)
    splits = max(1, min(triton.cdiv(target_programs, batch_groups), triton.cdiv(hw, 2 * block_hw)))
    num_warps = 8 if block_c * block_hw >= 4096 else 4
    return block_c, block_hw, splits, num_warps


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def group_norm(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """GroupNorm (+ SiLU) of x [N, C, H, W], NCHW or channels-last; the output keeps x's memory format."""
    return _group_norm(x, num_groups, weight, bias, eps, silu)


def _group_norm(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                eps: float, silu: bool, block_hw: Optional[int] = None, splits: Optional[int] = None) -> torch.Tensor:
    """`group_norm` with the tile height and the split count optionally forced (tests use it)."""
    _check_inputs(x, num_groups, weight, bias)
    check_runnable(_group_norm_stats_kernel, *(t for t in (x, weight, bias) if t is not None))
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    y = torch.empty_like(x)  # dense x: same strides, so one set of strides addresses both
    n, c, h, w = x.shape
    if y.numel() == 0:
        return y
    hw = h * w
    cpg = c // num_groups
    block_c, default_block_hw, default_splits, num_warps = _launch_config(n * num_groups, cpg, hw, x.device)
    block_hw = block_hw or default_block_hw
    splits = splits or default_splits
    # Whole tiles per split; recompute the split count so that no split is empty.
    hw_per_split = triton.cdiv(triton.cdiv(hw, splits), block_hw) * block_hw
    splits = triton.cdiv(hw, hw_per_split)

    partial = torch.empty((n * num_groups, splits, 3), device=x.device, dtype=torch.float32)
    # Dense in either format: stride(2) == W * stride(3), so H*W flattens with one stride (a size-1 dim's
    # stride can be anything, hence the W == 1 case).
    stride_n, stride_c, stride_hw = x.stride(0), x.stride(1), x.stride(3) if w > 1 else x.stride(2)
    grid = (n * num_groups, splits)
    _group_norm_stats_kernel[grid](
        x, partial, hw, hw_per_split, splits, num_groups, cpg, stride_n, stride_c, stride_hw,
        BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=num_warps)
    _group_norm_apply_kernel[grid](
        x, y, weight if weight is not None else x, bias if bias is not None else x, partial,
        hw, hw_per_split, splits, num_groups, cpg, float(eps), stride_n, stride_c, stride_hw,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SILU=bool(silu),
        INTERPRETER_BF16=x.dtype == torch.bfloat16 and is_interpreted(_group_norm_apply_kernel),
        BLOCK_C=block_c, BLOCK_HW=block_hw, BLOCK_SPLITS=triton.next_power_of_2(splits), num_warps=num_warps)
    return y


def _check_inputs(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor]) -> None:
    if x.dim() != 4:
        raise InvalidInputError(f"x: expected a 4-d tensor [N, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise InvalidInputError(f"x: dtype {x.dtype} not supported (float32, float16, bfloat16)")
    channels = x.shape[1]
    if not isinstance(num_groups, int) or num_groups <= 0 or channels % num_groups != 0:
        raise InvalidInputError(f"num_groups: must be a positive int dividing the {channels} channels, "
                                f"got {num_groups!r}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (channels,):
            raise InvalidInputError(f"{name}: expected shape ({channels},), got {tuple(t.shape)}")
        if t is not None and t.dtype not in _DTYPES:
            raise InvalidInputError(f"{name}: dtype {t.dtype} not supported (float32, float16, bfloat16)")


# ------------------------------------------------------------------------------------------ reference
def group_norm_reference(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor],
                         bias: Optional[torch.Tensor], eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """What the kernel computes, in plain torch (in x's dtype)."""
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y
