"""`sdrt build`: TensorRT engines from an ONNX export, cached by ONNX hash, profile, flags, TensorRT and GPU."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from sdrt.cli.export import COMPONENTS, component_names

HELP = "build TensorRT engines from an ONNX export (cached by ONNX hash, profile, flags, TensorRT, GPU)"


def add_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("--onnx", required=True, type=Path, help="an export directory written by `sdrt export`")
    b.add_argument("--out", required=True, type=Path, help="engine cache directory")
    b.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp16")
    b.add_argument("--components", default=None,
                   help=f"comma-separated subset of {COMPONENTS} (SDXL: and text_encoder_2; default: all exported)")
    b.add_argument("--batch", default="1:1:4", help="min:opt:max batch")
    b.add_argument("--height", default="256:512:1024", help="min:opt:max image height in pixels")
    b.add_argument("--width", default="256:512:1024", help="min:opt:max image width in pixels")
    b.add_argument("--static", default=None, metavar="BxHxW",
                   help="one static shape (batch x height x width) instead of a range; enables CUDA graphs")
    b.add_argument("--refit", action="store_true", help="build refittable engines (LoRA weight swaps)")


def run(args: argparse.Namespace) -> int:
    from sdrt.export.engine_cache import BuildFlags
    from sdrt.export.onnx import read_export
    from sdrt.export.tensorrt import load_or_build, require_tensorrt

    names = component_names(args.components)
    profile = _profile(args)
    require_tensorrt()
    export = read_export(args.onnx)
    contracts = _contracts_from_manifest(export)
    profile.validate(export.manifest["vae_scale"])
    flags = BuildFlags(precision=args.precision, refit=args.refit, static=profile.is_static)
    for name in export.components if names is None else names:
        start = time.perf_counter()
        load_or_build(export, contracts[name], profile, flags, args.out)
        print(f"{name}: engine ready in {time.perf_counter() - start:.1f} s")
    return 0


def _contracts_from_manifest(export):
    """Contracts need only the configs, which the manifest carries: no weights are loaded to build."""
    from types import SimpleNamespace

    from sdrt.config import CLIPTextConfig, UNetConfig, VAEConfig
    from sdrt.export.contracts import contracts_for

    cfgs = export.manifest["configs"]

    def config(cls, raw):
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})

    def text(name):  # an SDXL export has text_encoder_2 (and the refiner's no text_encoder)
        return SimpleNamespace(config=config(CLIPTextConfig, cfgs[name])) if name in cfgs else None

    components = SimpleNamespace(unet=SimpleNamespace(config=config(UNetConfig, cfgs["unet"])),
                                 vae=SimpleNamespace(config=config(VAEConfig, cfgs["vae"])),
                                 text_encoder=text("text_encoder"), text_encoder_2=text("text_encoder_2"))
    return contracts_for(components)


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
