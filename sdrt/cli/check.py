"""`sdrt check`: a backend against the float32 torch reference (see `sdrt.parity`); exit 1 when a limit fails.
Every run uses one matmul policy (TF32 off), stated in the report. `--backend torch` in a low precision is
the baseline itself: its report says "baseline only" and exits 0."""
from __future__ import annotations

import argparse
import json

HELP = "compare a backend with the float32 torch reference: per-component errors and image PSNR"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="diffusers folder or .safetensors checkpoint, or random:tiny|sd15|sd21|tiny-sdxl|sdxl "
                        "(random weights built in memory; default: the bundled tiny model)")
    p.add_argument("--backend", default="torch",
                   help="torch, triton, onnxruntime, tensorrt or openvino (default torch)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: float16 on cuda)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps end to end (default 20)")
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable; default: two built in)")
    p.add_argument("--size", type=int, default=None, help="square image size (default: the model's native size)")
    p.add_argument("--json", default=None, help="also write the report as JSON to this file")


def run(args: argparse.Namespace) -> int:
    from sdrt.checks import Limits, check_output_file, check_pixels, check_size, check_steps, check_text
    from sdrt.errors import InvalidInputError

    # every argument is checked before the model is loaded and the three runs are made
    limits = Limits.from_env()
    steps = check_steps(args.steps, limits, "--steps")
    if args.size is not None:
        check_pixels(check_size("--size", args.size), args.size, limits, f"--size {args.size}")
    for prompt in args.prompt or ():
        check_text("--prompt", prompt)
    json_path = None if args.json is None else check_output_file(args.json, "--json", make_parents=True)

    from sdrt import parity
    prompts = args.prompt or list(parity.DEFAULT_PROMPTS)
    report = parity.compare(args.model, args.backend, dtype=args.dtype, device=args.device, prompts=prompts,
                            steps=steps, height=args.size, width=args.size)
    print(report.table())
    if json_path is not None:
        try:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
        except OSError as e:
            raise InvalidInputError(f"cannot write --json {str(json_path)!r}: {e.strerror or e}") from None
    return 1 if report.passed is False else 0
