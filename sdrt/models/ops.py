"""The one dispatch point between the reference modules and the fused kernels.

Models call `attention` and `group_norm` from here. By default they run plain torch ops; a backend
switches the implementation for the duration of a call with `use_kernels(...)`, which is scoped by a
ContextVar, so a reference model and a fast model can run side by side in one process.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator, Optional, Protocol

import torch
import torch.nn.functional as F


class Kernels(Protocol):
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  scale: Optional[float] = None) -> torch.Tensor: ...

    def group_norm(self, x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float = 1e-5, silu: bool = False) -> torch.Tensor: ...


class TorchKernels:
    """The reference implementation: plain torch ops."""

    @staticmethod
    def attention(q, k, v, scale=None):
        # q: [B, H, Lq, D], k/v: [B, H, Lk, D]
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    @staticmethod
    def group_norm(x, num_groups, weight, bias, eps=1e-5, silu=False):
        y = F.group_norm(x, num_groups, weight, bias, eps)
        return F.silu(y) if silu else y


_current: ContextVar[Kernels] = ContextVar("sdrt_kernels", default=TorchKernels())


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    return _current.get().attention(q, k, v, scale)


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
