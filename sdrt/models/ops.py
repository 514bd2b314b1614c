"""The one dispatch point between the reference modules and the fused kernels.

Models call `attention` and `group_norm` from here. By default they run plain torch ops; a backend
switches the implementation for the duration of a call with `use_kernels(...)`, which is scoped by a
ContextVar, so a reference model and a fast model can run side by side in one process.

`attention(..., upcast=True)` (a U-Net config's `upcast_attention`, set by SD 2.1) is a contract every
implementation keeps: the scores q k^T * scale and their softmax are computed in float32 whatever the
inputs' dtype, as diffusers' `Attention(upcast_attention=True)` does (SD 2.1's scores overflow fp16).
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator, Optional, Protocol

import torch
import torch.nn.functional as F

LOW_PRECISION = (torch.float16, torch.bfloat16)

class Kernels(Protocol):
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                  upcast: bool = False) -> torch.Tensor: ...

    def group_norm(self, x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float = 1e-5, silu: bool = False) -> torch.Tensor: ...


class TorchKernels:
    """The reference implementation: plain torch ops."""

    @staticmethod
    def attention(q, k, v, scale=None, upcast=False):
        # q: [B, H, Lq, D], k/v: [B, H, Lk, D]
        if upcast and q.dtype in LOW_PRECISION:
            # all of it in fp32, then rounded once: which SDPA kernel runs (and in what precision it keeps
            # its scores) is torch's choice per device, so only fp32 inputs guarantee fp32 scores. The
            # ONNX export of this is Casts around an fp32 attention, which ONNX Runtime and TensorRT keep.
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    @staticmethod
    def group_norm(x, num_groups, weight, bias, eps=1e-5, silu=False):
        y = F.group_norm(x, num_groups, weight, bias, eps)
        return F.silu(y) if silu else y


_current: ContextVar[Kernels] = ContextVar("sdrt_kernels", default=TorchKernels())


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
              upcast: bool = False) -> torch.Tensor:
    """softmax(q k^T * scale) v; upcast: scores and softmax in float32 (see the module docstring)."""
    return _current.get().attention(q, k, v, scale, upcast)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
               eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    return _current.get().group_norm(x, num_groups, weight, bias, eps, silu)


@contextlib.contextmanager
def use_kernels(kernels: Kernels) -> Iterator[None]:
    """Run the enclosed model calls with `kernels` in place of the torch reference ops."""
    token = _current.set(kernels)
    try:
        yield
    finally:
        _current.reset(token)
