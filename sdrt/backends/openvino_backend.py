"""The `openvino` backend (CPU): the ONNX export (`sdrt.export.onnx`, cached by weight digest) compiled by
OpenVINO's CPU plugin, which reads ONNX directly.

Settings: fp32 inference precision pinned (`INFERENCE_PRECISION_HINT f32`: on CPUs with AMX or AVX-512 BF16
OpenVINO would otherwise pick bf16 and drift from the reference), the LATENCY hint, and one thread per
core torch uses (`torch.get_num_threads()`). Shapes stay dynamic: one compiled model serves every batch
and resolution. Tensors cross as numpy views. LoRA is not supported here (no initializer overrides).
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from sdrt.components import Components
from sdrt.errors import BackendUnavailableError, InvalidInputError, ModelLoadError
from sdrt.export.contracts import ExportContract, contracts_for
from sdrt.export.graph_components import graph_components
from sdrt.export.onnx import OnnxExport, export_onnx

log = logging.getLogger(__name__)


class OpenVinoModel:
    """One OpenVINO compiled model called with and returning torch tensors (CPU)."""

    def __init__(self, path, contract: ExportContract, dtype: torch.dtype, threads: int):
        import openvino as ov

        self.contract, self.dtype = contract, dtype
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": threads}
        try:
            self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        except Exception as e:  # openvino raises its own untyped errors for unreadable graphs
            detail = " ".join(str(e).split())[:300]
            raise ModelLoadError(f"{path}: OpenVINO cannot compile this graph ({detail})") from None
        self.request = self.compiled.create_infer_request()

    def __call__(self, **inputs: torch.Tensor) -> list[torch.Tensor]:
        feed = {n: np.ascontiguousarray(inputs[n].detach().to("cpu", self.contract.input_dtype(n, self.dtype)).numpy())
                for n in self.contract.input_names}
        results = self.request.infer(feed)
        # copies: the request reuses its output buffers on the next call
        return [torch.from_numpy(np.array(results[self.compiled.output(n)])) for n in self.contract.output_names]


def prepare(components: Components, device: torch.device, dtype: torch.dtype) -> Components:
    try:
        import openvino  # noqa: F401
    except ImportError:
        raise BackendUnavailableError("the openvino backend needs openvino: pip install 'sdrt[openvino]'") from None
    if torch.device(device).type != "cpu":
        raise InvalidInputError(f"the openvino backend runs on device='cpu' only, got device={device}")
    return from_export(components, export_onnx(components))


def from_export(components: Components, export: OnnxExport) -> Components:
    """`components` with the three models replaced by OpenVINO compiled models on `export`."""
    threads = torch.get_num_threads()
    log.info("openvino backend (CPU, %d threads) from %s", threads, export.directory)
    return graph_components(components, {name: OpenVinoModel(export.path(name), contract, export.dtype, threads)
                                         for name, contract in contracts_for(components).items()})
