"""Export the text encoder, U-Net and VAE encoder/decoder to ONNX, resumably and atomically.

Layout of a finished export directory:
    manifest.json                 written last; its presence and validity mark the export finished
    text_encoder.onnx  unet.onnx  vae_encoder.onnx  vae_decoder.onnx   (+ <name>.onnx.data over 2 GB)

Work happens in `<out>.partial/` beside the target. Each component there is finished when its
`<name>.done.json` (file hashes + export settings) exists, so an interrupted export resumes with the
components it has not finished; once all are done the manifest is written and the folder renamed into
place. A directory whose manifest is missing, unreadable, or disagrees with its files is never used.
Processes exporting into the same folder take turns on a lock file beside it (`.<name>.lock`); the
later one then reuses the finished export. A finished export is reused only for the same settings and
the same weights (`sdrt.export.weights_digest`: a sha256 of the configs and every tensor), never on a
model's name or path: in-memory models share names, and loaded weights can change in place.

Exporter: the TorchScript exporter (`dynamo=False`) is the default. On these modules it gives a correct
graph with dynamic batch/height/width (the U-Net's `interpolate(size=skip.shape[-2:])` stays a dynamic
Resize) about 6x faster than the dynamo exporter (tiny SD1 model: ~5 s vs ~29 s for all four), with
matching error (~1e-6). torch marks it deprecated; `exporter="dynamo"` (opset 18+) is the path forward
and is tested.

No graph clean-up pass is applied: the dynamo exporter's onnxscript-optimized U-Net (half the nodes)
ran no faster in ONNX Runtime on CPU than the plain TorchScript graph (tiny SD1, batch 2, 32x32
latents: 104 ms vs 88 ms), since ONNX Runtime fuses at session creation anyway.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import torch

import sdrt
from sdrt.components import Components
from sdrt.errors import BackendUnavailableError, InvalidInputError, ModelLoadError
from sdrt.export.causal_attention import dtype_preserving_causal_attention
from sdrt.export.contracts import ALL_COMPONENTS, ExportContract, check_component_names, contracts_for
from sdrt.export.weights_digest import weights_digest

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2  # 2: the U-Net's context has a dynamic length (77 per prompt chunk)
DEFAULT_OPSET = 17
EXPORTERS = ("torchscript", "dynamo")
EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
PROTOBUF_LIMIT = 2 ** 31 - 1  # one ONNX protobuf cannot exceed 2 GB: larger models keep weights outside
# trace at a small size with batch 2, so no axis is specialised to 1 and every resolution stays symbolic
_TRACE_BATCH, _TRACE_LATENT = 2, 8


@dataclass(frozen=True)
class OnnxExport:
    """A finished, verified export directory."""
    directory: Path
    manifest: dict

    @property
    def dtype(self) -> torch.dtype:
        return EXPORT_DTYPES[self.manifest["dtype"]]

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(self.manifest["components"])

    def path(self, component: str) -> Path:
        if component not in self.manifest["components"]:
            raise InvalidInputError(f"component must be one of {', '.join(self.components)} "
                                    f"(exported in {self.directory}), got {component!r}")
        return self.directory / f"{component}.onnx"

    def sha256(self, component: str) -> str:
        """One digest over the component's files (graph and external data)."""
        files = self.manifest["components"][component]["files"]
        return hashlib.sha256("".join(files[f]["sha256"] for f in sorted(files)).encode()).hexdigest()


def export_onnx(components: Components, out_dir: Union[str, Path, None] = None, *,
                names: Optional[Iterable[str]] = None, opset: int = DEFAULT_OPSET, exporter: str = "torchscript",
                force: bool = False, external_data_threshold: int = PROTOBUF_LIMIT,
                contracts: Optional[dict[str, ExportContract]] = None, digest: Optional[str] = None) -> OnnxExport:
    """Export `names` at the components' dtype (float32 or float16) into `out_dir` (None: the cache folder
    `default_export_dir` names); returns the finished export. names: None = every component of the model
    (SDXL: text_encoder_2 too, see `sdrt.export.sdxl_contracts`). An existing finished export with the same
    settings and weights is reused unless `force`. contracts: other graphs than the model's own (ControlNet's,
    `sdrt.export.control_contracts`), with `digest` the weights they hold (default: the model's)."""
    _require_onnx()
    contracts = contracts_for(components) if contracts is None else contracts
    available = tuple(contracts)
    names = check_component_names(available if names is None else names, available)
    if exporter not in EXPORTERS:
        raise InvalidInputError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    if opset < 17:
        raise InvalidInputError(f"opset must be 17 or newer, got {opset}")
    if exporter == "dynamo" and opset < 18:
        # the dynamo exporter emits opset-18 ops (Split with num_outputs) that do not convert down to 17
        log.info("the dynamo exporter needs opset 18 or newer; exporting at opset 18")
        opset = 18
    dtype = _components_dtype(components)
    digest = digest or weights_digest(components)
    settings = {"dtype": _dtype_name(dtype), "opset": opset, "exporter": exporter, "weights_sha256": digest}
    out_dir = default_export_dir(components, digest) if out_dir is None else Path(out_dir)
    if not force:
        existing = _reusable(out_dir, settings, names)
        if existing is not None:
            log.info("reusing the ONNX export in %s", out_dir)
            return existing
    if out_dir.exists() and not _is_export_dir(out_dir):
        raise InvalidInputError(f"out_dir {out_dir} exists and is not an sdrt ONNX export; choose another folder")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(out_dir.with_name(f".{out_dir.name}.lock")):
        # another process exporting into out_dir (two first uses of a backend) may have finished it meanwhile
        existing = None if force else _reusable(out_dir, settings, names)
        if existing is not None:
            log.info("reusing the ONNX export in %s", out_dir)
            return existing
        return _export_staged(components, contracts, out_dir, names, settings, force, external_data_threshold)


def read_export(directory: Union[str, Path], verify_hashes: bool = True) -> OnnxExport:
    """A finished export, or ModelLoadError naming what is missing, truncated or altered."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ModelLoadError(f"{directory}: not a finished ONNX export (no {MANIFEST}); run `sdrt export` again")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        entries = manifest["components"]
        if manifest["format"] != MANIFEST_FORMAT or manifest["dtype"] not in EXPORT_DTYPES:
            raise ValueError(f"format {manifest['format']!r}, dtype {manifest['dtype']!r}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: unreadable export manifest ({e}); run `sdrt export` again") from None
    for name, entry in entries.items():
        _check_files(directory, entry["files"], verify_hashes, f"{directory}: component {name}")
    return OnnxExport(directory, manifest)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- steps
def _export_staged(components: Components, contracts: dict[str, ExportContract], out_dir: Path,
                   names: tuple[str, ...], settings: dict, force: bool, external_data_threshold: int) -> OnnxExport:
    staging = out_dir.with_name(out_dir.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    entries = {}
    for name in names:
        entry = None if force else _finished_component(staging, name, settings)
        if entry is None:
            start = time.perf_counter()
            entry = _export_component(components, contracts[name], staging, settings, external_data_threshold)
            log.info("exported %s in %.1f s", name, time.perf_counter() - start)
        else:
            log.info("resuming: %s already exported in %s", name, staging)
        entries[name] = entry

    manifest = {"format": MANIFEST_FORMAT, "sdrt_version": sdrt.__version__, "torch_version": torch.__version__,
                **settings, "source": components.source, "vae_scale": components.vae.config.downsample_factor,
                "configs": {part: asdict(getattr(components, part).config)
                            for part in ("unet", "vae", "text_encoder", "text_encoder_2")
                            if getattr(components, part, None) is not None},
                "components": entries}
    for name in names:
        (staging / f"{name}.done.json").unlink()
    _write_json_atomic(staging / MANIFEST, manifest)
    _replace_dir(staging, out_dir)
    return read_export(out_dir)


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """An advisory lock on `path` (created if absent, kept after) for the block; released if the process dies."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _export_component(components: Components, contract: ExportContract, staging: Path, settings: dict,
                      threshold: int) -> dict:
    import onnx

    name, dtype = contract.name, EXPORT_DTYPES[settings["dtype"]]
    for stale in staging.glob(f"{name}.onnx*"):
        stale.unlink()
    scratch = staging / f".{name}.scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    module = contract.module(components).eval()
    device = next(module.parameters()).device
    scale = components.vae.config.downsample_factor
    args = tuple(contract.sample_inputs(_TRACE_BATCH, _TRACE_LATENT * scale, _TRACE_LATENT * scale, dtype,
                                        device).values())
    traced = scratch / f"{name}.onnx"
    with torch.no_grad():
        _torch_export(module, args, traced, contract, settings["opset"], settings["exporter"])

    final = staging / f"{name}.onnx"
    size = sum(p.stat().st_size for p in scratch.iterdir())
    if size > threshold or len(list(scratch.iterdir())) > 1:
        # gather the weights into one `<name>.onnx.data` file beside the graph
        model = onnx.load(str(traced), load_external_data=True)
        onnx.save_model(model, str(final), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{name}.onnx.data", size_threshold=1024)
        del model
    else:
        os.replace(traced, final)
    shutil.rmtree(scratch)
    try:
        onnx.checker.check_model(str(final), full_check=True)  # full_check runs strict shape inference too
        onnx.shape_inference.infer_shapes_path(str(final), str(final), check_type=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ModelLoadError(f"the exported {name} graph failed ONNX validation: {e}") from e

    files = {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size}
             for p in sorted(staging.glob(f"{name}.onnx*"))}
    entry = {"files": files, "settings": settings,
             "inputs": {n: _tensor_spec(contract, n, dtype) for n in contract.input_names},
             "outputs": {n: _tensor_spec(contract, n, dtype) for n in contract.output_names}}
    _write_json_atomic(staging / f"{name}.done.json", entry)
    return entry


def _torch_export(module, args, path: Path, contract: ExportContract, opset: int, exporter: str) -> None:
    common = dict(input_names=list(contract.input_names), output_names=list(contract.output_names),
                  opset_version=opset)
    with warnings.catch_warnings():
        # the TorchScript exporter's deprecation notice and tracer warnings about Python-side shape
        # arithmetic, which the dynamic axes cover (checked at two resolutions in the tests)
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            with dtype_preserving_causal_attention(opset):
                torch.onnx.export(module, args, str(path), dynamo=False, do_constant_folding=True,
                                  dynamic_axes=contract.dynamic_axes, **common)
        else:
            shapes = tuple(contract.dynamic_axes[n] for n in contract.input_names)
            program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=shapes, verbose=False, **common)
            program.save(str(path))


def _tensor_spec(contract: ExportContract, name: str, dtype: torch.dtype) -> dict:
    shape = (contract.input_shapes(1, 1, 1).get(name) or
             contract.output_shapes(contract.input_shapes(1, 1, 1)).get(name))
    axes = contract.dynamic_axes.get(name, {})
    return {"dtype": _dtype_name(contract.fixed_input_dtypes.get(name, dtype)),
            "shape": [axes.get(i, d) for i, d in enumerate(shape)]}


def _reusable(out_dir: Path, settings: dict, names: tuple[str, ...]) -> Optional[OnnxExport]:
    if not (out_dir / MANIFEST).is_file():
        return None
    try:
        export = read_export(out_dir)
    except ModelLoadError as e:
        log.warning("redoing the ONNX export: %s", e)
        return None
    same = all(export.manifest.get(k) == v for k, v in settings.items())
    return export if same and set(names) <= set(export.components) else None


def _finished_component(staging: Path, name: str, settings: dict) -> Optional[dict]:
    done = staging / f"{name}.done.json"
    try:
        entry = json.loads(done.read_text(encoding="utf-8"))
        if entry["settings"] != settings:
            return None
        _check_files(staging, entry["files"], True, name)
        return entry
    except (OSError, ValueError, KeyError, TypeError, ModelLoadError):
        return None


def _check_files(directory: Path, files: dict, verify_hashes: bool, what: str) -> None:
    for fname, info in files.items():
        path = directory / fname
        if not path.is_file():
            raise ModelLoadError(f"{what}: {fname} is missing")
        if path.stat().st_size != info["bytes"]:
            raise ModelLoadError(f"{what}: {fname} is truncated or altered ({path.stat().st_size} bytes, "
                                 f"expected {info['bytes']}); run `sdrt export` again")
        if verify_hashes and file_sha256(path) != info["sha256"]:
            raise ModelLoadError(f"{what}: {fname} does not match its recorded sha256; run `sdrt export` again")


def _is_export_dir(path: Path) -> bool:
    """Only folders that hold nothing but our own files may be replaced."""
    names = ALL_COMPONENTS + ("controlnet", "unet_control")  # sdrt.export.control_contracts
    ours = {MANIFEST} | {f"{n}.onnx" for n in names} | {f"{n}.onnx.data" for n in names}
    return path.is_dir() and all(p.name in ours for p in path.iterdir())


def _replace_dir(staging: Path, target: Path) -> None:
    old = target.with_name(f"{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _components_dtype(components: Components) -> torch.dtype:
    dtypes = {next(m.parameters()).dtype for m in components.modules()}
    if len(dtypes) != 1 or not dtypes <= set(EXPORT_DTYPES.values()):
        raise InvalidInputError(f"dtype must be one of {', '.join(EXPORT_DTYPES)} for ONNX export, got "
                                f"{', '.join(sorted(_dtype_name(d) for d in dtypes))}")
    return dtypes.pop()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise BackendUnavailableError("ONNX export needs the `onnx` package: pip install 'sdrt[onnx]'") from None


def default_export_dir(components: Components, digest: Optional[str] = None) -> Path:
    """Where the `onnxruntime` and `tensorrt` backends keep a model's export: under $SDRT_CACHE
    (default ~/.cache/sdrt), keyed by the weights' digest (`weights_digest`, computed unless given) and dtype."""
    key = (digest or weights_digest(components))[:16]
    name = Path(components.source).name.replace(" ", "-") or "model"
    return cache_root() / "onnx" / f"{name}-{key}-{_dtype_name(_components_dtype(components))}"


def cache_root() -> Path:
    """$SDRT_CACHE, default ~/.cache/sdrt: exports under onnx/, engines under tensorrt/."""
    return Path(os.environ.get("SDRT_CACHE", Path.home() / ".cache" / "sdrt")).expanduser()
