"""The `onnxruntime` backend: the three components run as ONNX Runtime sessions on an export directory.

The export is made on first use (see `sdrt.export.onnx.default_export_dir`) and reused after. On CPU,
tensors cross into ONNX Runtime as numpy views. On CUDA (`onnxruntime-gpu`), inputs and outputs are
bound by device pointer to torch CUDA tensors (IO binding) and ONNX Runtime runs on torch's current
stream, so nothing goes through host memory in the denoising loop.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

from sdrt.components import Components
from sdrt.errors import BackendUnavailableError, ModelLoadError
from sdrt.export.contracts import ExportContract, contracts_for
from sdrt.export.graph_components import graph_components
from sdrt.export.onnx import OnnxExport, export_onnx

log = logging.getLogger(__name__)

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


class OrtModel:
    """One ONNX Runtime session called with and returning torch tensors."""

    def __init__(self, path, contract: ExportContract, device: torch.device, dtype: torch.dtype):
        import onnxruntime as ort

        self.contract, self.device, self.dtype = contract, device, dtype
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailableError("the onnxruntime backend on CUDA needs onnxruntime-gpu "
                                              "(pip install 'sdrt[gpu]'); this onnxruntime has only "
                                              f"{', '.join(ort.get_available_providers())}")
            stream = torch.cuda.current_stream(device).cuda_stream
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0,
                                                    "user_compute_stream": str(stream)})]
        else:
            providers = ["CPUExecutionProvider"]
        self.path, self._providers = path, providers
        self._overrides: dict[str, np.ndarray] = {}  # initializer name -> the value that replaces the file's
        self.session = self._new_session()

    def _new_session(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # fp16 graphs log one constant-folding warning per node on CPU
        if self._overrides:
            # ORT_ENABLE_ALL's layout transforms (NCHWc convs on CPU) read Conv weights from the file, ignoring
            # add_initializer (onnxruntime 1.32: a zeroed conv_in override changed nothing); one level lower
            # honours every override
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        # add_initializer keeps a reference only: the OrtValues must outlive the session
        self._override_values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._overrides.values()]
        for name, value in zip(self._overrides, self._override_values):
            options.add_initializer(name, value)
        try:
            return ort.InferenceSession(str(self.path), options, providers=self._providers)
        except Exception as e:  # onnxruntime raises its own untyped errors for unreadable graphs
            raise ModelLoadError(f"{self.path}: ONNX Runtime cannot load this graph ({e})") from None

    def override_initializers(self, values: dict[str, Optional[np.ndarray]]) -> None:
        """Rebuild the session with these initializers replaced (no re-export), e.g. with a LoRA fused;
        None = back to the file's value. With no override left the session is built as at first."""
        for name, value in values.items():
            if value is None:
                self._overrides.pop(name, None)
            else:
                self._overrides[name] = value
        self.session = self._new_session()

    def __call__(self, **inputs: torch.Tensor) -> list[torch.Tensor]:
        inputs = {n: inputs[n].to(self.device, self.contract.input_dtype(n, self.dtype)).contiguous()
                  for n in self.contract.input_names}
        if self.device.type == "cuda":
            return self._run_bound(inputs)
        feed = {n: t.detach().numpy() for n, t in inputs.items()}
        return [torch.from_numpy(a) for a in self.session.run(list(self.contract.output_names), feed)]

    def _run_bound(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        shapes = self.contract.output_shapes({n: tuple(t.shape) for n, t in inputs.items()})
        outputs = [torch.empty(shapes[n], dtype=self.dtype, device=self.device) for n in self.contract.output_names]
        binding = self.session.io_binding()
        for (name, t) in list(inputs.items()) + list(zip(self.contract.output_names, outputs)):
            bind = binding.bind_input if name in inputs else binding.bind_output
            bind(name, "cuda", self.device.index or 0, _NUMPY_DTYPES[t.dtype], list(t.shape), t.data_ptr())
        self.session.run_with_iobinding(binding)
        return outputs


def prepare(components: Components, device: torch.device, dtype: torch.dtype) -> Components:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise BackendUnavailableError("the onnxruntime backend needs onnxruntime: pip install 'sdrt[onnx]' "
                                      "(or 'sdrt[gpu]' for CUDA)") from None
    export = export_onnx(components)  # the cache folder for these weights
    return from_export(components, export, device)


def from_export(components: Components, export: OnnxExport, device: torch.device) -> Components:
    """`components` with the three models replaced by sessions on `export` (tokenizer and configs kept)."""
    device = torch.device(device)
    log.info("onnxruntime backend on %s from %s", device, export.directory)
    return graph_components(components, {name: OrtModel(export.path(name), contract, device, export.dtype)
                                         for name, contract in contracts_for(components).items()})
