"""backend="auto": the fastest installed backend for a device, in the order measured on it.

CPU order from bench/results/cpu-candidates-2026-12-04.json (SD 1.5 config U-Net, 2-core AVX2, fp32):
see CPU_ORDER. CUDA: triton when it is importable, else torch. The default backend stays "torch";
"auto" is only what a caller asks for.
"""
from __future__ import annotations

import importlib.util

import torch

from sdrt.backends import BACKENDS
from sdrt.errors import InvalidInputError

CPU_ORDER = ("openvino", "onnxruntime", "torch")  # fastest first, each needs its package (torch always there)
_PACKAGES = {"openvino": "openvino", "onnxruntime": "onnxruntime", "triton": "triton", "torch": "torch"}


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """`name` itself when it names a backend; for "auto" the first installed one of the device's order
    (float32 only on CPU: the exported CPU paths run fp32, other dtypes get torch)."""
    if name != "auto":
        if name not in BACKENDS:
            raise InvalidInputError(f"backend must be one of auto, {', '.join(BACKENDS)}, got {name!r}")
        return name
    if device.type == "cuda":
        order = ("triton", "torch")
    else:
        order = CPU_ORDER if dtype == torch.float32 else ("torch",)
    return next(b for b in order if importlib.util.find_spec(_PACKAGES[b]) is not None)
