"""`sdrt bench`: sdrt against diffusers on the same random weights, side by side in one run.

On CUDA: the SD 1.5 config at 512x512 (and secondary rows); on a CPU: the tiny config, so anyone can
try it. --model random:NAME benchmarks another config instead (random:sdxl: SDXL at 1024x1024, 30 steps, CFG,
against diffusers' StableDiffusionXLPipeline; random:tiny-sdxl on a CPU; random:sd15 --size 256|512 on a CPU: the
full-size CPU rows, repeated and interleaved). Prints a table and writes JSON and a PNG bar chart into --out.
See bench/README.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = "benchmark sdrt against diffusers on the same random-weight model (table, JSON, PNG)"
ROW_NAMES = ("sdrt torch", "sdrt triton", "sdrt onnxruntime", "sdrt openvino", "diffusers eager", "diffusers compile")
COMPILE_MODES = ("max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead", "default")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="output folder (default bench/results)")
    p.add_argument("--model", default=None, metavar="random:NAME",
                   help="the random-weight config of the main rows, at its native size: random:tiny|sd15|sd21|"
                        "tiny-sdxl|sdxl (default: sd15 on cuda, tiny on cpu; no secondary rows when given)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's native size)")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default 50 on cuda, 10 on cpu, 3 on cpu with a full-size --model)")
    p.add_argument("--runs", type=int, default=None,
                   help="timed end-to-end runs per main row and repetition (default 5; 1 on cpu with a full-size model)")
    p.add_argument("--repeats", type=int, default=None,
                   help="repetitions of the main rows, interleaved (default 1; 2 on cpu with a full-size model)")
    p.add_argument("--compile-budget", type=float, default=180.0,
                   help="seconds allowed for torch.compile's first call before that row is skipped (default 180)")
    p.add_argument("--compile-mode", default="max-autotune", choices=COMPILE_MODES,
                   help="torch.compile mode of the diffusers compile row (default max-autotune)")
    p.add_argument("--no-secondary", action="store_true", help="skip the batch-4 and SD 2.1 rows")
    p.add_argument("--rows", action="append", choices=ROW_NAMES, default=None, help="only these rows (repeatable)")


def run(args: argparse.Namespace) -> int:
    from sdrt.bench import report, side_by_side
    from sdrt.checks import check_positive_int
    from sdrt.errors import InvalidInputError
    from sdrt.parity import RANDOM_PREFIX
    from sdrt.pipeline import _resolve_device

    for name in ("steps", "runs", "repeats", "size"):
        if getattr(args, name) is not None:
            check_positive_int(name, getattr(args, name))
    if args.model is not None and not args.model.startswith(RANDOM_PREFIX):
        raise InvalidInputError(f"--model must be {RANDOM_PREFIX}NAME (sdrt bench runs random weights only), "
                                f"got {args.model!r}")
    model = None if args.model is None else args.model.removeprefix(RANDOM_PREFIX)
    device = _resolve_device(args.device)
    stamp = report.new_stamp()
    if args.size is not None and args.size % 8:
        raise InvalidInputError(f"size must be a multiple of 8, got {args.size}")
    result = side_by_side.run_bench(device, size=args.size, steps=args.steps, runs=args.runs,
                                    repeats=args.repeats, compile_budget_s=args.compile_budget,
                                    compile_mode=args.compile_mode,
                                    secondary=not args.no_secondary,
                                    rows=None if args.rows is None else set(args.rows), model=model,
                                    on_row=lambda partial: report.write_json(partial, args.out, stamp))
    print(report.table(result))
    json_path, png_path = report.write(result, args.out, stamp)
    print(f"wrote {json_path}" + (f" and {png_path}" if png_path else " (no PNG: matplotlib is not installed)"))
    return 0
