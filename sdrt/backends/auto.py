"""backend="auto": the fastest installed backend for a device, in the order measured on it.

CPU: openvino, then onnxruntime, then torch. Measured with `sdrt bench --device cpu --model random:sd15 --size 512
--repeats 3` (bench/results/bench-cpu-sd15-512-2026-12-06.json: 2-core AMD EPYC, fp32, batch 1 with CFG): U-Net
it/s openvino 0.146 (static shapes, Winograd convolutions), onnxruntime 0.106, sdrt torch 0.097, diffusers eager
0.095; at 256x256 the same order (README).
CUDA: triton when it is importable, else torch. The default backend stays "torch"; "auto" is only what a caller
asks for.
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
