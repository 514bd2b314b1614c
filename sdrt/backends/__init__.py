"""Backends: each runs the same three components (text encoder, U-Net, VAE) its own way.

A backend module provides `prepare(components, device, dtype) -> Components`: it returns the
components with `text_encoder(ids)`, `unet(sample, timestep, context)`, `vae.encode(images)` and
`vae.decode(latents)` replaced by its own implementations, keeping the reference semantics (shapes,
value ranges, `vae.scaling_factor`, `unet.config`). The pipeline only ever calls those.
"""
from __future__ import annotations

import importlib

import torch

from sdrt.components import Components
from sdrt.errors import InvalidInputError

BACKENDS = ("torch", "triton", "onnxruntime", "tensorrt", "openvino")


def prepare_backend(name: str, components: Components, device: torch.device, dtype: torch.dtype) -> Components:
    if name not in BACKENDS:
        raise InvalidInputError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    module = importlib.import_module(f"sdrt.backends.{name}_backend")
    return module.prepare(components, device, dtype)
