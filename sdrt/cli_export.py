"""`sdrt export` (ONNX) and `sdrt build` (TensorRT engines) subcommands.

`add_export_commands(subparsers)` registers both on `sdrt.cli`'s subparsers, with `run` set to a handler
that takes the parsed arguments and returns the exit code: 0 done, 2 bad input, a missing/corrupt model
or an unavailable backend (one line on stderr). The top level stays free of torch, as `sdrt.cli` asks.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sdrt.errors import SdrtError

EXPORT_HELP = "export a model's components to ONNX (resumable; a half-written export is never used)"
BUILD_HELP = "build TensorRT engines from an ONNX export (cached by ONNX hash, profile, flags, TensorRT, GPU)"


def add_export_commands(subparsers: argparse._SubParsersAction) -> None:
    # the option lists, without importing torch or the export modules
    components = "text_encoder,unet,vae_encoder,vae_decoder"

    p = subparsers.add_parser("export", help=EXPORT_HELP, description=EXPORT_HELP)
    p.add_argument("--model", default=None, help="diffusers folder or .safetensors file (default: bundled tiny model)")
    p.add_argument("--out", required=True, type=Path, help="export directory")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--components", default=components, help=f"comma-separated subset of {components}")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 17 or newer (dynamo: 18 or newer)")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript")
    p.add_argument("--device", default="cpu", help="device to trace on: cpu or cuda")
    p.add_argument("--force", action="store_true", help="redo the export even if a finished one matches")
    p.set_defaults(run=run_export)

    b = subparsers.add_parser("build", help=BUILD_HELP, description=BUILD_HELP)
    b.add_argument("--onnx", required=True, type=Path, help="an export directory written by `sdrt export`")
    b.add_argument("--out", required=True, type=Path, help="engine cache directory")
    b.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp16")
    b.add_argument("--components", default=components, help=f"comma-separated subset of {components}")
    b.add_argument("--batch", default="1:1:4", help="min:opt:max batch")
    b.add_argument("--height", default="256:512:1024", help="min:opt:max image height in pixels")
    b.add_argument("--width", default="256:512:1024", help="min:opt:max image width in pixels")
    b.add_argument("--static", default=None, metavar="BxHxW",
                   help="one static shape (batch x height x width) instead of a range; enables CUDA graphs")
    b.add_argument("--refit", action="store_true", help="build refittable engines (LoRA weight swaps)")
    b.set_defaults(run=run_build)


def run_export(args: argparse.Namespace) -> int:
    import torch

    from sdrt.components import load_components
    from sdrt.export.onnx import export_onnx
    from sdrt.pipeline import _resolve_device

    try:
        start = time.perf_counter()
        device = _resolve_device(args.device)  # a one-line error for meta, unknown or unavailable devices
        components = load_components(args.model, dtype=getattr(torch, args.dtype), device=device)
        export = export_onnx(components, args.out, names=_names(args.components), opset=args.opset,
                             exporter=args.exporter, force=args.force)
    except SdrtError as e:
        return _fail("export", e)
    print(f"exported {', '.join(export.components)} ({args.dtype}, opset {export.manifest['opset']}) "
          f"to {export.directory} in {time.perf_counter() - start:.1f} s")
    return 0


def run_build(args: argparse.Namespace) -> int:
    from sdrt.export.engine_cache import BuildFlags
    from sdrt.export.onnx import read_export
    from sdrt.export.tensorrt import load_or_build, require_tensorrt

    try:
        names = _names(args.components)
        profile = _profile(args)
        require_tensorrt()
        export = read_export(args.onnx)
        contracts = _contracts_from_manifest(export)
        profile.validate(export.manifest["vae_scale"])
        flags = BuildFlags(precision=args.precision, refit=args.refit, static=profile.is_static)
        for name in names:
            start = time.perf_counter()
            load_or_build(export, contracts[name], profile, flags, args.out)
            print(f"{name}: engine ready in {time.perf_counter() - start:.1f} s")
    except SdrtError as e:
        return _fail("build", e)
    return 0


def _contracts_from_manifest(export):
    """Contracts need only the configs, which the manifest carries: no weights are loaded to build."""
    from types import SimpleNamespace

    from sdrt.config import CLIPTextConfig, UNetConfig, VAEConfig
    from sdrt.export.contracts import contracts_for

    cfgs = export.manifest["configs"]

    def config(cls, raw):
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})

    components = SimpleNamespace(unet=SimpleNamespace(config=config(UNetConfig, cfgs["unet"])),
                                 vae=SimpleNamespace(config=config(VAEConfig, cfgs["vae"])),
                                 text_encoder=SimpleNamespace(config=config(CLIPTextConfig, cfgs["text_encoder"])))
    return contracts_for(components)


def _names(text: str) -> tuple[str, ...]:
    from sdrt.export.contracts import check_component_names
    return check_component_names(n.strip() for n in text.split(",") if n.strip())


def _profile(args: argparse.Namespace):
    from sdrt.errors import InvalidInputError
    from sdrt.export.contracts import ShapeProfile

    def triple(name: str, text: str) -> tuple[int, int, int]:
        parts = text.split(":")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise InvalidInputError(f"--{name} must be min:opt:max integers, got {text!r}")
        return tuple(int(p) for p in parts)

    if args.static:
        parts = args.static.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise InvalidInputError(f"--static must be BxHxW integers, got {args.static!r}")
        return ShapeProfile.static(*(int(p) for p in parts))
    return ShapeProfile(triple("batch", args.batch), triple("height", args.height), triple("width", args.width))


def _fail(command: str, error: SdrtError) -> int:
    message = " ".join(str(error).split())
    print(f"sdrt {command}: error: {message}", file=sys.stderr)
    return 2
