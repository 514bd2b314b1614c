"""`sdrt export`: a model's components to ONNX (resumable, atomic; a half-written export is never used)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional

HELP = "export a model's components to ONNX (resumable; a half-written export is never used)"
COMPONENTS = "text_encoder,unet,vae_encoder,vae_decoder"  # SD's; an SDXL model adds text_encoder_2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="diffusers folder or .safetensors file (default: bundled tiny model)")
    p.add_argument("--out", required=True, type=Path, help="export directory")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--components", default=None,
                   help=f"comma-separated subset of {COMPONENTS} (SDXL: and text_encoder_2; default: all the model has)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 17 or newer (dynamo: 18 or newer)")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript")
    p.add_argument("--device", default="cpu", help="device to trace on: cpu or cuda")
    p.add_argument("--force", action="store_true", help="redo the export even if a finished one matches")


def run(args: argparse.Namespace) -> int:
    import torch

    from sdrt.components import load_components
    from sdrt.export.onnx import export_onnx
    from sdrt.pipeline import _resolve_device

    start = time.perf_counter()
    device = _resolve_device(args.device)  # a one-line error for meta, unknown or unavailable devices
    components = load_components(args.model, dtype=getattr(torch, args.dtype), device=device)
    export = export_onnx(components, args.out, names=component_names(args.components), opset=args.opset,
                         exporter=args.exporter, force=args.force)
    print(f"exported {', '.join(export.components)} ({args.dtype}, opset {export.manifest['opset']}) "
          f"to {export.directory} in {time.perf_counter() - start:.1f} s")
    return 0


def component_names(text: Optional[str]) -> Optional[tuple[str, ...]]:
    """--components "a,b" -> checked component names (shared with `sdrt build`); None -> None (all)."""
    from sdrt.export.contracts import ALL_COMPONENTS, check_component_names
    if text is None:
        return None
    return check_component_names((n.strip() for n in text.split(",") if n.strip()), ALL_COMPONENTS)
