"""The `tensorrt` backend: TensorRT engines built from the ONNX export, run on torch CUDA tensors.

Engines come from the engine cache under $SDRT_CACHE/tensorrt (built on first use, rebuilt when the
ONNX file, profile, flags, TensorRT version or GPU changes). The default profile spans batch 1-8 and
half to twice the model's native resolution (SDXL: 768..1344 around 1024, batch 1-4); a static profile
(`prepare_engines(..., profile=ShapeProfile.static(batch, height, width))`) also captures each engine in
a CUDA graph.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from sdrt.components import Components
from sdrt.errors import BackendUnavailableError
from sdrt.export.contracts import ShapeProfile, contracts_for
from sdrt.export.engine_cache import BuildFlags
from sdrt.export.graph_components import graph_components
from sdrt.export.onnx import cache_root, export_onnx
from sdrt.export.sdxl_contracts import sdxl_profile
from sdrt.export.tensorrt import Engine, load_or_build, require_tensorrt

log = logging.getLogger(__name__)

_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def default_profile(components: Components) -> ShapeProfile:
    """Batch 1-8, half to twice the native side; SDXL: `sdxl_profile` (768..1344 around 1024, batch 1-4)."""
    side = components.unet.config.sample_size * components.vae.config.downsample_factor
    if getattr(components, "text_encoder_2", None) is not None:
        return sdxl_profile(side, components.vae.config.downsample_factor)
    return ShapeProfile(batch=(1, 2, 8), height=(side // 2, side, side * 2), width=(side // 2, side, side * 2))


def prepare(components: Components, device: torch.device, dtype: torch.dtype) -> Components:
    return prepare_engines(components, device, dtype)


def prepare_engines(components: Components, device: torch.device, dtype: torch.dtype,
                    profile: Optional[ShapeProfile] = None, refit: bool = False,
                    cache_dir: Optional[Path] = None) -> Components:
    require_tensorrt()
    device = torch.device(device)
    if device.type != "cuda":
        raise BackendUnavailableError(f"the tensorrt backend runs on CUDA only, got device={device}")
    if dtype == torch.bfloat16:
        # ONNX Runtime and the exporters have no bf16 path worth trusting: export fp32, build with BF16
        for module in (components.text_encoder, components.unet, components.vae):
            module.float()
    profile = profile or default_profile(components)
    profile.validate(components.vae.config.downsample_factor)
    flags = BuildFlags(precision=_PRECISION[dtype], refit=refit, static=profile.is_static)
    export = export_onnx(components)  # the cache folder for these weights
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "tensorrt"
    engines = {name: Engine(load_or_build(export, contract, profile, flags, cache_dir), contract, device,
                            cuda_graph=profile.is_static)
               for name, contract in contracts_for(components).items()}
    for name, engine in engines.items():
        engine.onnx_path = export.path(name)  # where a refit (LoRA) finds each weight's initializer name
    log.info("tensorrt backend: %s engines from %s", flags, cache_dir)
    return graph_components(components, engines)
