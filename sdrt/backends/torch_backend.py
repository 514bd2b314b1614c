"""The `torch` backend: the reference modules as written, on any device and dtype."""
from __future__ import annotations

import torch

from sdrt.components import Components


def prepare(components: Components, device: torch.device, dtype: torch.dtype) -> Components:
    for module in components.modules():
        module.to(device=device, dtype=dtype)
    return components
