"""ControlNets on the `onnxruntime` backend: each ControlNet and the U-Net with residual inputs exported on first
use (`sdrt.export.control_contracts`, cached by their weights' digests beside the model's export) and run as
ONNX Runtime sessions."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Sequence

import torch

from sdrt.backends.onnxruntime_backend import OrtModel
from sdrt.components import Components
from sdrt.export.control_contracts import controlnet_contract, unet_control_contract
from sdrt.export.control_graphs import GraphControlNet, GraphResidualUNet
from sdrt.export.onnx import cache_root, default_export_dir, export_onnx
from sdrt.export.weights_digest import tensor_sha256, weights_digest
from sdrt.models.controlnet import ControlNet


def controlnet_digest(net: ControlNet) -> str:
    """sha256 over the ControlNet's config and tensors (as `weights_digest` does for a model)."""
    h = hashlib.sha256(json.dumps(asdict(net.config), sort_keys=True, default=str).encode())
    for name, t in net.state_dict().items():
        h.update(f"{name} {str(t.dtype).removeprefix('torch.')} {list(t.shape)} {tensor_sha256(t)}\n".encode())
    return h.hexdigest()


def prepare_control(components: Components, nets: Sequence[ControlNet], device: torch.device,
                    dtype: torch.dtype) -> tuple[GraphResidualUNet, list[GraphControlNet]]:
    """(the U-Net that takes residuals, the ControlNets) as ONNX Runtime sessions; `components` are the torch
    modules the model's own export was made from."""
    contract = unet_control_contract(components)
    digest = weights_digest(components)
    folder = default_export_dir(components, digest)
    export = export_onnx(components, folder.with_name(folder.name + "-unet_control"), names=("unet_control",),
                         contracts={"unet_control": contract}, digest=digest)
    unet = GraphResidualUNet(OrtModel(export.path("unet_control"), contract, device, export.dtype),
                             components.unet.config, components.unet)
    graphs = []
    scale = components.vae.config.downsample_factor
    for net in nets:
        net_contract, net_digest = controlnet_contract(net, scale), controlnet_digest(net)
        out = cache_root() / "onnx" / f"controlnet-{net_digest[:16]}-{str(dtype).removeprefix('torch.')}"
        net_export = export_onnx(components, out, names=("controlnet",), contracts={"controlnet": net_contract},
                                 digest=net_digest)
        graphs.append(GraphControlNet(OrtModel(net_export.path("controlnet"), net_contract, device, net_export.dtype),
                                      net.config, net))
    return unet, graphs
