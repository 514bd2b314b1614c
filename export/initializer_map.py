"""Which ONNX initializer holds which torch weight, found by value: the map that lets a changed weight (a fused
LoRA) reach an exported graph without re-exporting it (ONNX Runtime initializer overrides, TensorRT refit).

Names cannot be trusted: the TorchScript exporter keeps a parameter's name only where the weight is used as
is; a bias-free Linear becomes a MatMul on a constant-folded transpose named `onnx::MatMul_123`. So every
initializer is hashed, and each weight is looked up by the hash of its bytes (in the export dtype) and, for a
matrix, of its transpose.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Union

import numpy as np
import torch


@dataclass(frozen=True)
class InitializerSlot:
    name: str          # the ONNX initializer
    transposed: bool   # it holds weight.T (a MatMul's right-hand side)
    dtype: torch.dtype  # the export's dtype

    def value(self, weight: torch.Tensor) -> np.ndarray:
        """The initializer's array for the torch `weight` (on the CPU, contiguous)."""
        w = weight.detach().to("cpu", self.dtype)
        return (w.t() if self.transposed else w).contiguous().numpy()


def _digest(array: np.ndarray) -> tuple:
    return array.shape, array.dtype.str, hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).digest()


def initializer_map(onnx_path: Union[str, Path], weights: Mapping[str, torch.Tensor],
                    dtype: torch.dtype) -> dict[str, InitializerSlot]:
    """{weight name: its slot} for each weight of `weights` that the graph at `onnx_path` holds as an initializer
    (as is or transposed); a weight folded into another constant is absent from the map."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=True)
    by_digest: dict[tuple, str] = {}
    for init in model.graph.initializer:
        by_digest.setdefault(_digest(numpy_helper.to_array(init)), init.name)
    slots = {}
    for name, weight in weights.items():
        w = weight.detach().to("cpu", dtype)
        for transposed in (False, True) if w.dim() == 2 else (False,):
            found = by_digest.get(_digest((w.t() if transposed else w).contiguous().numpy()))
            if found is not None:
                slots[name] = InitializerSlot(found, transposed, dtype)
                break
    return slots
