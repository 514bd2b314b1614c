"""CPU candidates for the full-size U-Net (SD 1.5 config, random weights, fp32 unless named): one table to choose from.

    python -m sdrt.bench.cpu_candidates --onnx-dir DIR --out bench/results [--latent 32] [--rounds 2]
                                        [--only NAME ...] [--calls 2]

DIR is a finished ONNX export of `random_weights.components("sd15")` (`python -m sdrt.bench.bench_export --dir DIR`),
so every candidate runs the same weights. Each candidate runs in its own process (one full-size model in memory at
a time: the machine is shared), and the rounds interleave them (A B C A B C) so that load from other processes
falls on all rows alike. Per process: load/compile time, first call, `--calls` timed calls, peak RSS, the load
averages, and the output's max abs difference from the sdrt torch fp32 output on the same inputs (U-Net on the CFG
batch: 2 x 4 x latent x latent, context 2 x 77 x 768, timestep 500). U-Net it/s = 1 / median call time over all
rounds. Writes cpu-candidates-<date>.json into --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

UNET_SEED = 1  # random_weights.components(name, seed=0) initialises the U-Net with seed 0 + 1
REFERENCE = "sdrt torch"


# ------------------------------------------------------------------------------------------- candidates
def _torch_unet():
    import torch

    from sdrt.models import random_weights
    from sdrt.models.unet import UNet
    with torch.device("meta"):
        unet = UNet(random_weights.CONFIGS["sd15"][1])
    return random_weights.random_init_(unet.to_empty(device="cpu"), UNET_SEED).eval().requires_grad_(False)


def _torch_call(module, channels_last: bool = False) -> Callable:
    import torch

    def call(x, t, ctx):
        with torch.inference_mode():
            x = torch.from_numpy(x)
            x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            return module(x, torch.from_numpy(t), torch.from_numpy(ctx)).contiguous().numpy()
    return call


def sdrt_torch(_: Path) -> Callable:
    return _torch_call(_torch_unet())


def sdrt_torch_channels_last(_: Path) -> Callable:
    import torch
    return _torch_call(_torch_unet().to(memory_format=torch.channels_last), channels_last=True)


def sdrt_torch_compile(_: Path) -> Callable:
    import torch
    return _torch_call(torch.compile(_torch_unet()))


def diffusers_eager(_: Path) -> Callable:
    import dataclasses

    import torch
    from diffusers import UNet2DConditionModel

    from sdrt.bench.models import diffusers_twin
    ours = _torch_unet()
    config = dataclasses.asdict(ours.config)
    unet = diffusers_twin(lambda: UNet2DConditionModel(**config), ours, "cpu", torch.float32)
    del ours

    def call(x, t, ctx):
        with torch.inference_mode():
            return unet(torch.from_numpy(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx)).sample.numpy()
    return call


def _ort(path: Path, threads: int = 2) -> Callable:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x, t, ctx: session.run(None, {"sample": x, "timestep": t, "encoder_hidden_states": ctx})[0]


def ort_default(onnx_dir: Path) -> Callable:
    return _ort(onnx_dir / "unet.onnx", threads=0)  # 0: ONNX Runtime's own choice


def ort_intra2(onnx_dir: Path) -> Callable:
    return _ort(onnx_dir / "unet.onnx", threads=2)


def ort_transformers_optimized(onnx_dir: Path) -> Callable:
    """onnxruntime.transformers' SD U-Net passes with the fusions whose ops have CPU kernels (LayerNorm,
    SkipLayerNorm, Gelu, BiasGelu); GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd, NhwcConv and packed QKV/KV
    are CUDA-only contrib ops and stay off. The attention fusion is off too: its pattern matcher fails on sdrt's
    exported attention (onnxruntime 1.32, fusion_attention_unet.get_num_heads: "only 0-dimensional arrays can be
    converted to Python scalars")."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    target = onnx_dir.parent / f"{onnx_dir.name}-ort-optimized" / "unet.onnx"
    if not target.is_file():
        options = FusionOptions("unet")
        for flag in ("enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu", "enable_bias_add",
                     "enable_nhwc_conv", "enable_packed_qkv", "enable_packed_kv", "enable_attention"):
            setattr(options, flag, False)
        start = time.perf_counter()
        model = optimize_model(str(onnx_dir / "unet.onnx"), model_type="unet", num_heads=0, hidden_size=0,
                               opt_level=0, optimization_options=options, use_gpu=False)
        log(f"fused ops: {model.get_fused_operator_statistics()}")
        target.parent.mkdir(exist_ok=True)
        model.save_model_to_file(str(target), use_external_data_format=True, all_tensors_to_one_file=True)
        log(f"optimized in {time.perf_counter() - start:.0f} s")
        del model
    return _ort(target)


def _openvino(onnx_dir: Path, precision: str, static_shape: tuple | None = None, compress_int8: bool = False,
              winograd: bool = False):
    import openvino as ov
    core = ov.Core()
    model = core.read_model(str(onnx_dir / "unet.onnx"))
    if static_shape is not None:
        model.reshape(dict(zip(("sample", "timestep", "encoder_hidden_states"), static_shape)))
    if winograd:
        from sdrt.backends.openvino_winograd import rewrite_convolutions
        log(f"winograd: {rewrite_convolutions(model)} convolutions rewritten")
    if compress_int8:
        import nncf
        model = nncf.compress_weights(model)  # INT8_ASYM weight-only on the MatMul/Conv weights nncf supports
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                 "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 2})
    request = compiled.create_infer_request()
    out = compiled.output(0)
    return lambda x, t, ctx: np.array(request.infer({"sample": x, "timestep": t, "encoder_hidden_states": ctx})[out])


def openvino_f32(onnx_dir: Path) -> Callable:
    return _openvino(onnx_dir, "f32")


def openvino_f32_static(onnx_dir: Path) -> Callable:
    return _openvino(onnx_dir, "f32", static_shape=_SHAPES)


def openvino_f32_winograd(onnx_dir: Path) -> Callable:
    return _openvino(onnx_dir, "f32", static_shape=_SHAPES, winograd=True)


def openvino_bf16(onnx_dir: Path) -> Callable:
    return _openvino(onnx_dir, "bf16")


def openvino_int8_weights(onnx_dir: Path) -> Callable:
    return _openvino(onnx_dir, "f32", compress_int8=True)


CANDIDATES: dict[str, Callable[[Path], Callable]] = {
    "sdrt torch": sdrt_torch, "diffusers eager": diffusers_eager,
    "sdrt torch channels_last": sdrt_torch_channels_last,
    "onnxruntime (threads default)": ort_default, "onnxruntime intra_op 2": ort_intra2,
    "onnxruntime + transformers SD passes": ort_transformers_optimized,
    "openvino f32": openvino_f32, "openvino f32 static shape": openvino_f32_static,
    "openvino f32 static + winograd": openvino_f32_winograd,
    "openvino bf16": openvino_bf16, "openvino f32 + int8 weights (nncf)": openvino_int8_weights,
    "sdrt torch.compile (inductor)": sdrt_torch_compile,
}
_SHAPES: tuple = ()


# ---------------------------------------------------------------------------------------------- worker
def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def inputs(latent: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (rng.standard_normal((2, 4, latent, latent), dtype=np.float32), np.full((2,), 500.0, np.float32),
            rng.standard_normal((2, 77, 768), dtype=np.float32))


def worker(name: str, onnx_dir: Path, latent: int, calls: int, reference: Path, result_path: Path) -> None:
    global _SHAPES
    x, t, ctx = inputs(latent)
    _SHAPES = (x.shape, t.shape, ctx.shape)
    loads = [os.getloadavg()]
    start = time.perf_counter()
    call = CANDIDATES[name](onnx_dir)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    out = call(x, t, ctx)
    first_s = time.perf_counter() - start
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call(x, t, ctx)
        times.append(time.perf_counter() - start)
    loads.append(os.getloadavg())
    if name == REFERENCE and not reference.is_file():
        np.save(reference, out)
    diff = None
    if reference.is_file():
        ref = np.load(reference)
        diff = dict(max_abs=float(np.abs(out - ref).max()), ref_max_abs=float(np.abs(ref).max()),
                    mean_abs=float(np.abs(out - ref).mean()))
    result = dict(name=name, load_s=load_s, first_call_s=first_s, call_s=times, load_averages=loads,
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, vs_reference=diff)
    result_path.write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------ orchestrator
def machine() -> dict:
    flags = set(Path("/proc/cpuinfo").read_text().split())
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor())
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return dict(cpu=model, cores=os.cpu_count(), memory_gb=round(mem_gb, 1),
                isa=sorted(f for f in flags if f in {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16"}),
                platform=platform.platform(), python=platform.python_version(), versions=_versions(),
                shared="2 cores shared with other engineers' test runs: see each run's load averages")


def _versions() -> dict:
    import importlib.metadata as md
    out = {}
    for pkg in ("torch", "diffusers", "onnxruntime", "openvino", "nncf", "onnx"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--onnx-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--latent", type=int, default=32, help="latent side (32 = 256x256 images)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--calls", type=int, default=2, help="timed calls per process after the first")
    p.add_argument("--only", action="append", choices=list(CANDIDATES), default=None)
    p.add_argument("--once", action="append", choices=list(CANDIDATES), default=[],
                   help="candidates run in the first round only (e.g. the long torch.compile)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per process")
    p.add_argument("--worker", choices=list(CANDIDATES), help=argparse.SUPPRESS)
    p.add_argument("--reference", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.onnx_dir, args.latent, args.calls, args.reference, args.result)

    names = args.only or list(CANDIDATES)
    names = [REFERENCE] + [n for n in names if n != REFERENCE]  # the reference output is written first
    work = Path(tempfile.mkdtemp(prefix="sdrt-cpu-candidates-"))
    reference = work / "reference.npy"
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names:
            if r and name in args.once:
                continue
            result = work / f"{r}-{len(runs[name])}.json"
            cmd = [sys.executable, "-m", "sdrt.bench.cpu_candidates", "--onnx-dir", str(args.onnx_dir),
                   "--latent", str(args.latent), "--calls", str(args.calls), "--worker", name,
                   "--reference", str(reference), "--result", str(result)]
            log(f"round {r + 1}: {name}")
            try:
                # cwd: not the checkout, whose top-level kernels/ folder would shadow the `kernels` package diffusers imports
                proc = subprocess.run(cmd, timeout=args.timeout, capture_output=True, text=True, cwd=work)
                ok = proc.returncode == 0 and result.is_file()
                errors = [ln for ln in proc.stderr.splitlines() if "Error" in ln] or proc.stderr.splitlines()[-1:]
                entry = json.loads(result.read_text()) if ok else dict(name=name, error=f"exit {proc.returncode}: {errors[-1:]}")
            except subprocess.TimeoutExpired:
                entry = dict(name=name, error=f"timed out after {args.timeout:.0f} s")
            log(f"  {json.dumps(entry)[:400]}")
            runs[name].append(entry)
            _write(args, runs, complete=False)
    _write(args, runs, complete=True)


def _write(args, runs: dict[str, list[dict]], complete: bool) -> None:
    rows = []
    for name, entries in runs.items():
        ok = [e for e in entries if "error" not in e]
        times = [t for e in ok for t in e["call_s"]]
        row = dict(name=name, unet_its=1 / statistics.median(times) if times else None, processes=len(ok),
                   median_call_s=statistics.median(times) if times else None, calls_s=times,
                   load_s=[e["load_s"] for e in ok], first_call_s=[e["first_call_s"] for e in ok],
                   peak_rss_mb=max((e["peak_rss_mb"] for e in ok), default=None),
                   vs_reference=ok[0]["vs_reference"] if ok else None, load_averages=[e["load_averages"] for e in ok],
                   errors=[e["error"] for e in entries if "error" in e])
        rows.append(row)
    base = next((r["unet_its"] for r in rows if r["name"] == "diffusers eager" and r["unet_its"]), None)
    for row in rows:
        row["speedup_vs_diffusers_eager"] = row["unet_its"] / base if base and row["unet_its"] else None
    now = datetime.datetime.now(datetime.timezone.utc)
    result = dict(what=f"SD 1.5-config U-Net, random weights, batch 2 (CFG) x 4 x {args.latent} x {args.latent}, "
                       "context 2 x 77 x 768; one process per candidate and round, rounds interleaved",
                  date=now.isoformat(timespec="seconds"), machine=machine(), rounds=args.rounds, calls=args.calls,
                  complete=complete, rows=rows)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cpu-candidates-{now.date()}-latent{args.latent}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    if complete:
        print(f"{'candidate':<40} {'U-Net it/s':>10} {'vs diffusers':>12} {'1st call s':>10} {'peak MB':>8} {'max|d|':>9}")
        for r in rows:
            d = (r["vs_reference"] or {}).get("max_abs")
            cells = [f"{r['unet_its']:.3f}" if r["unet_its"] else "-",
                     f"{r['speedup_vs_diffusers_eager']:.2f}x" if r["speedup_vs_diffusers_eager"] else "-",
                     f"{min(r['first_call_s']):.1f}" if r["first_call_s"] else "-",
                     f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] else "-", f"{d:.2e}" if d is not None else "-"]
            print(f"{r['name']:<40} {cells[0]:>10} {cells[1]:>12} {cells[2]:>10} {cells[3]:>8} {cells[4]:>9}"
                  + (f"  errors: {r['errors']}" if r["errors"] else ""))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
