"""The `openvino` backend (CPU): the ONNX export (`sdrt.export.onnx`, cached by weight digest) compiled by
OpenVINO's CPU plugin, which reads ONNX directly.

Settings: fp32 inference precision pinned (`INFERENCE_PRECISION_HINT f32`: on CPUs with AMX or AVX-512 BF16
OpenVINO would otherwise pick bf16 and drift from the reference), the LATENCY hint, and one thread per
core torch uses (`torch.get_num_threads()`). Tensors cross as numpy views. LoRA is not supported here (no
initializer overrides), so the torch modules are freed once exported (SD 1.5: 4 GB less resident).

Static shapes: each graph is compiled for the input shapes of the call (batch, resolution, prompt chunks) and
recompiled when they change, keeping one compiled model per graph. Static shapes let OpenVINO plan every
layer for its size and let `sdrt.backends.openvino_winograd` turn the large 3x3 convolutions into Winograd
F(4x4, 3x3) ones (SD 1.5 config, 2-core CPU: see the README's CPU table). The price is a compile on the first
call at a new shape (full-size SD 1.5 U-Net: seconds) and 4x the weight memory of the rewritten layers.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from sdrt.backends.openvino_winograd import rewrite_convolutions
from sdrt.components import Components
from sdrt.errors import BackendUnavailableError, InvalidInputError, ModelLoadError
from sdrt.export.contracts import ExportContract, contracts_for
from sdrt.export.graph_components import graph_components
from sdrt.export.onnx import OnnxExport, export_onnx

log = logging.getLogger(__name__)


class OpenVinoModel:
    """One OpenVINO graph, compiled for the input shapes of the latest call, called with and returning torch
    tensors (CPU)."""

    def __init__(self, path: Path, contract: ExportContract, dtype: torch.dtype, threads: int):
        import openvino as ov

        self.path, self.contract, self.dtype = path, contract, dtype
        self.core = ov.Core()
        self.config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                       "INFERENCE_NUM_THREADS": threads}
        self.model = self._openvino("read", lambda: self.core.read_model(str(path)))
        self.shapes: Optional[tuple] = None
        self.compiled = self.request = None
        self.winograd_layers = 0  # convolutions rewritten for the current shapes

    def __call__(self, **inputs: torch.Tensor) -> list[torch.Tensor]:
        feed = {n: np.ascontiguousarray(inputs[n].detach().to("cpu", self.contract.input_dtype(n, self.dtype)).numpy())
                for n in self.contract.input_names}
        shapes = tuple(feed[n].shape for n in self.contract.input_names)
        if shapes != self.shapes:
            self._compile(shapes)
        results = self.request.infer(feed)
        # copies: the request reuses its output buffers on the next call
        return [torch.from_numpy(np.array(results[self.compiled.output(n)])) for n in self.contract.output_names]

    def _compile(self, shapes: tuple) -> None:
        self.compiled = self.request = self.shapes = None  # the old compiled model goes before the new one is built
        model = self.model.clone()
        self._openvino("reshape", lambda: model.reshape(dict(zip(self.contract.input_names, map(list, shapes)))))
        self.winograd_layers = rewrite_convolutions(model)
        start = time.perf_counter()
        self.compiled = self._openvino("compile", lambda: self.core.compile_model(model, "CPU", self.config))
        self.request, self.shapes = self.compiled.create_infer_request(), shapes
        log.info("openvino: compiled %s for %s in %.1f s (%d Winograd convolutions)", self.path.name,
                 " ".join("x".join(map(str, s)) for s in shapes), time.perf_counter() - start, self.winograd_layers)

    def _openvino(self, step: str, call):
        try:
            return call()
        except Exception as e:  # openvino raises its own untyped errors for unreadable graphs
            detail = " ".join(str(e).split())[:300]
            raise ModelLoadError(f"{self.path}: OpenVINO cannot {step} this graph ({detail})") from None


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
                                         for name, contract in contracts_for(components).items()},
                            keep_modules=False)
