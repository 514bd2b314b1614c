"""Where a Triton kernel can run: CUDA tensors compile it, CPU tensors need Triton's interpreter.

`@triton.jit` decides at decoration time, from TRITON_INTERPRET, whether a kernel is compiled or
interpreted, so a kernel module imported without TRITON_INTERPRET=1 cannot run on CPU tensors later.
"""
from __future__ import annotations

import torch

from sdrt.errors import BackendUnavailableError, InvalidInputError


def is_interpreted(kernel) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def check_runnable(kernel, *tensors: torch.Tensor) -> None:
    """Raise unless all tensors share one device on which `kernel` can run."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise InvalidInputError(f"tensors: all inputs must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    interpreted = is_interpreted(kernel)
    if device.type == "cuda" and interpreted:
        raise BackendUnavailableError("triton kernels were loaded with TRITON_INTERPRET=1 and cannot run on CUDA "
                                      "tensors in this process")
    if device.type != "cuda" and not interpreted:
        raise BackendUnavailableError(f"triton kernels need CUDA tensors (got {device}); CPU tensors run only "
                                      "under Triton's interpreter (set TRITON_INTERPRET=1 before the first kernel call)")
