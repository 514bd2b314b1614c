"""TensorRT engines from the ONNX export (TensorRT 10 Python API): build, cache, run, refit.

Written against the TensorRT 10 API and not yet run on a machine with TensorRT (none available to this
project); the cache logic it relies on (`engine_cache`) is tested without TensorRT.

Precision. An fp16 engine built from an fp16 export is a strongly typed network: TensorRT computes in
exactly the graph's types, so the graph's float32 parts (attention scores and softmax of an
`upcast_attention` U-Net, the timestep embedding) stay float32. Any other combination (fp16 or bf16 from
a float32 export) is weakly typed: TensorRT picks each layer's precision, the upcast scores included
(a warning says so for an upcast U-Net; bf16 has fp32's exponent range, so its scores cannot overflow).
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Optional

import torch

from sdrt.errors import BackendUnavailableError, InvalidInputError, ModelLoadError
from sdrt.export.contracts import ExportContract, ShapeProfile
from sdrt.export.engine_cache import BuildFlags, EngineCache, EngineKey, write_atomic
from sdrt.export.onnx import OnnxExport

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")
_WORKSPACE_BYTES = 4 << 30


def require_tensorrt():
    """The tensorrt module, or BackendUnavailableError saying what is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailableError("TensorRT is not installed (pip install 'sdrt[gpu]' on a CUDA machine)") from None
    if not torch.cuda.is_available():
        raise BackendUnavailableError("TensorRT needs a CUDA GPU, and torch sees none here")
    return trt


@functools.cache
def _logger():
    # one logger for the process: TensorRT keeps a single logger pointer for all builders, runtimes and
    # refitters, warns about every other one, and would hold a dangling pointer once its first is freed
    trt = require_tensorrt()
    return trt.Logger(trt.Logger.WARNING)


def build_engine(onnx_path: Path, contract: ExportContract, profile: ShapeProfile, flags: BuildFlags,
                 timing_cache: Optional[Path] = None, strongly_typed: bool = False) -> bytes:
    """Parse `onnx_path` and build a serialized engine with one optimization profile. strongly_typed: run
    the graph's own types (no precision flag), see the module docstring."""
    trt = require_tensorrt()
    logger = _logger()
    builder = trt.Builder(logger)
    # explicit batch is the only mode in TensorRT 10
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelLoadError(f"{onnx_path}: TensorRT cannot parse this ONNX graph ({errors})")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, _WORKSPACE_BYTES)
    if strongly_typed:
        pass  # the graph's types decide; precision flags are refused for strongly typed networks
    elif flags.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif flags.precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    if flags.refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in contract.profile_shapes(profile).items():
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=True)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ModelLoadError(f"TensorRT failed to build an engine for {onnx_path} (see the TensorRT log above)")
    if timing_cache is not None:
        write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def engine_key(export: OnnxExport, component: str, profile: ShapeProfile, flags: BuildFlags) -> EngineKey:
    trt = require_tensorrt()
    return EngineKey(component, export.sha256(component), profile, flags, trt.__version__,
                     torch.cuda.get_device_name())


def load_or_build(export: OnnxExport, contract: ExportContract, profile: ShapeProfile, flags: BuildFlags,
                  cache_dir: Path) -> bytes:
    """The engine plan for this export/profile/flags/TensorRT/GPU, built only when the cache lacks it."""
    key = engine_key(export, contract.name, profile, flags)
    timing_cache = Path(cache_dir) / f"timing-{key.tensorrt_version}-{key.gpu_name.replace(' ', '_')}.cache"
    strongly_typed = flags.precision == "fp16" and export.dtype == torch.float16
    if (contract.name == "unet" and not strongly_typed and flags.precision != "fp32"
            and export.manifest["configs"]["unet"].get("upcast_attention")):
        log.warning("the %s U-Net engine from a %s export lets TensorRT choose the attention scores' precision: "
                    "upcast_attention's float32 scores are kept only by fp16 engines from an fp16 export",
                    flags.precision, export.manifest["dtype"])
    return EngineCache(cache_dir).get_or_build(
        key, lambda: build_engine(export.path(contract.name), contract, profile, flags, timing_cache, strongly_typed))


class Engine:
    """A deserialized engine run with `execute_async_v3` on torch tensors, on torch's current stream.
    With `cuda_graph=True` (static-shape engines) the first call captures a CUDA graph, later calls
    copy their inputs into its buffers and replay it."""

    def __init__(self, plan: bytes, contract: ExportContract, device: torch.device, cuda_graph: bool = False):
        trt = require_tensorrt()
        self.trt, self.contract, self.device, self.cuda_graph = trt, contract, torch.device(device), cuda_graph
        self.runtime = trt.Runtime(_logger())
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ModelLoadError(f"TensorRT could not deserialize the {contract.name} engine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self._static_inputs: dict[str, torch.Tensor] = {}
        self._static_outputs: list[torch.Tensor] = []

    def __call__(self, **inputs: torch.Tensor) -> list[torch.Tensor]:
        inputs = {n: inputs[n].to(self.device, self.dtypes[n]).contiguous() for n in self.contract.input_names}
        if not self.cuda_graph:
            return self._execute(inputs)
        if self._graph is None:
            self._static_inputs = {n: t.clone() for n, t in inputs.items()}
            self._static_outputs = self._execute(self._static_inputs)  # TensorRT wants one run before capture
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._enqueue(self._static_inputs, self._static_outputs)
        for name, t in inputs.items():
            if t.shape != self._static_inputs[name].shape:
                raise InvalidInputError(f"{name} must have the static engine's shape "
                                        f"{tuple(self._static_inputs[name].shape)}, got {tuple(t.shape)}")
            self._static_inputs[name].copy_(t)
        self._graph.replay()
        return [t.clone() for t in self._static_outputs]

    def _execute(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        for name, t in inputs.items():
            # False (with only a TensorRT log line) when the shape is outside the engine's profile
            if not self.context.set_input_shape(name, tuple(t.shape)):
                lo, _, hi = (tuple(d) for d in self.engine.get_tensor_profile_shape(name, 0))
                raise InvalidInputError(f"{name} shape {tuple(t.shape)} is outside the {self.contract.name} "
                                        f"engine's profile (min {lo}, max {hi}); build engines for this size")
        outputs = [torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=self.dtypes[n], device=self.device)
                   for n in self.contract.output_names]
        self._enqueue(inputs, outputs)
        return outputs

    def _enqueue(self, inputs: dict[str, torch.Tensor], outputs: list[torch.Tensor]) -> None:
        for name, t in list(inputs.items()) + list(zip(self.contract.output_names, outputs)):
            self.context.set_tensor_address(name, t.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"TensorRT failed to enqueue the {self.contract.name} engine")

    @property
    def refittable(self) -> bool:
        return bool(self.engine.refittable)

    def refit(self, weights: dict[str, torch.Tensor]) -> None:
        """Swap named weights (ONNX initializer names) in a refit-enabled engine, e.g. with a LoRA merged."""
        trt = self.trt
        refitter = trt.Refitter(self.engine, _logger())
        host = {name: w.detach().cpu().contiguous().numpy() for name, w in weights.items()}  # kept alive until refit
        for name, array in host.items():
            if not refitter.set_named_weights(name, trt.Weights(array)):
                raise ModelLoadError(f"the {self.contract.name} engine has no refittable weight {name!r}")
        if not refitter.refit_cuda_engine():
            raise ModelLoadError(f"refitting the {self.contract.name} engine failed (was it built with refit=True?)")
        self._graph = None  # a captured graph may have baked in the old weights' addresses


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int64: torch.int64, trt.int32: torch.int32}
    return table[dtype]
