"""Fused Triton kernels: GroupNorm (+ SiLU) and flash attention forward.

    sdrt.kernels.group_norm(x, num_groups, weight, bias, eps=1e-5, silu=False)
    sdrt.kernels.attention(q, k, v, scale=None)
    with sdrt.models.ops.use_kernels(sdrt.kernels.TritonKernels()): unet(...)

Triton is imported on the first kernel call, so this package imports without it; the call then raises
BackendUnavailableError. CPU tensors run only under Triton's interpreter (TRITON_INTERPRET=1 set
before that first call); CUDA tensors compile.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

import torch

from sdrt.errors import BackendUnavailableError
from sdrt.models.ops import TorchKernels

__all__ = ["attention", "group_norm", "TritonKernels", "MAX_KERNEL_HEAD_DIM"]


def _kernel_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name is not None and e.name.split(".")[0] == "triton":
            raise BackendUnavailableError("the triton kernels need the `triton` package: pip install triton") from None
        raise


def group_norm(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """GroupNorm (+ SiLU) of x [N, C, H, W] (NCHW or channels-last; the output keeps x's format)."""
    return _kernel_module("group_norm_silu").group_norm(x, num_groups, weight, bias, eps, silu)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q k^T * scale) v with SDPA's shapes: q [B, H, Lq, D], k/v [B, H, Lk, D], any strides.

    Returns [B, H, Lq, D] as a transposed view of a contiguous [B, Lq, H, D] buffer.
    """
    return _kernel_module("flash_attention").attention(q, k, v, scale)


# The attention kernel keeps a [BLOCK_M, head_dim] fp32 accumulator in registers: up to 256 wide.
MAX_KERNEL_HEAD_DIM = 256


class TritonKernels:
    """The `sdrt.models.ops.Kernels` implementation backed by the Triton kernels.

    Attention heads wider than MAX_KERNEL_HEAD_DIM (the VAE's single 512-wide head) go to the torch
    reference (`sdrt.models.ops.TorchKernels`) instead; the U-Net's heads (40..160) all take the kernel.

    upcast (scores and softmax in float32): the kernel always works that way, so it needs no other code
    path. Its q k^T is a tensor-core dot of fp16/bf16 inputs accumulated in fp32 (each product of two
    fp16/bf16 numbers is exact in fp32, so that is q.float() @ k.float().T up to summation order), scaled
    in fp32, and the online softmax keeps its max, exponentials and sums in fp32. Only P is rounded to the
    input dtype before P V, as diffusers' upcast does (`attention_probs.to(value.dtype)`).
    """

    @staticmethod
    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                  upcast: bool = False) -> torch.Tensor:
        if q.dim() == 4 and q.shape[-1] > MAX_KERNEL_HEAD_DIM:
            return TorchKernels.attention(q, k, v, scale, upcast)
        return attention(q, k, v, scale)

    @staticmethod
    def group_norm(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
        return group_norm(x, num_groups, weight, bias, eps, silu)
