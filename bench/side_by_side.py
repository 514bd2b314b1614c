"""sdrt against diffusers on the same random weights, in one process and one run (`sdrt bench`).

Rows on CUDA (SD 1.5 config, 512x512, batch 1, 50 DDIM steps, CFG 7.5, fp16):
  sdrt torch (eager) | sdrt triton (CUDA graphs) | diffusers eager (SDPA) | diffusers + torch.compile
  (mode max-autotune, last so a compile over its budget cannot disturb the others), then secondary rows
  (20 steps, 2 runs): batch 4, and the SD 2.1 config (768x768, v-prediction), for sdrt triton and diffusers eager.
Rows on a CPU (fp32, the tiny config, few steps): sdrt torch, diffusers eager, sdrt onnxruntime and sdrt openvino
  (each skipped with its reason when its package is missing; SD configs: SDXL's get the first two).
`model=` (`sdrt bench --model random:NAME`) runs the main rows on another config at its native size (or `size=`),
without the secondary rows: `sdxl` is SDXL base 1.0's config at 1024x1024, 30 DDIM steps, CFG 5.0 (diffusers' SDXL
default), against diffusers' StableDiffusionXLPipeline; `tiny-sdxl` is its CPU-sized twin. A full-size config on a
CPU (e.g. `random:sd15 --size 256`) defaults to 3 steps, one timed loop and run per repetition, and 2 repetitions:
the main rows run `repeats` times interleaved (A B C D A B C D: load from other processes on a shared machine falls
on every row alike), each building its pipeline afresh (one full-size model in memory at a time), merged per row.

Measured per row:
  - U-Net it/s: steps / wall time of a generation from prompt embeddings to latents (the denoising loop
    and nothing else), median of `loop_runs`;
  - end-to-end latency p50/p90 over `runs` generations from token ids to decoded pixels (text encoder,
    loop, VAE decode) - both libraries take the same token ids, since the bench model's tokenizer is not CLIP's;
  - first-call time: the first end-to-end call (kernel compilation, autotuning, graph capture, torch.compile);
  - peak GPU memory over the row (weights included); on a CPU the process's peak RSS over the row (weights,
    export and runtime: Linux VmHWM, restarted at each row through /proc/self/clear_refs);
  - speedup: the row's U-Net it/s over diffusers eager's on the same case (sdrt rows);
  - MFU: the U-Net FLOPs of one CFG step, counted on the model with torch.utils.flop_counter (on the meta
    device), x it/s, over the GPU's dense fp16 tensor-core peak (GPU_PEAK_TFLOPS; unknown GPUs get none).
"""
from __future__ import annotations

import ctypes
import gc
import logging
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from sdrt.bench.models import diffusers_pipeline
from sdrt.bench.prompt_inputs import diffusers_prompt_inputs, sdrt_prompt_inputs
from sdrt.errors import BackendUnavailableError, InvalidInputError
from sdrt.models import random_weights

log = logging.getLogger(__name__)

# Dense (no sparsity) fp16 tensor-core peaks, TFLOP/s, from the vendors' datasheets; first match wins.
GPU_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4), ("A100", 312.0),
                   ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0), ("RTX 4090", 165.2), ("RTX 3090", 71.0))
CPU_EXPORTED_BACKENDS = ("onnxruntime", "openvino")  # the CPU rows beside sdrt torch and diffusers eager


@dataclass
class Case:
    model: str
    batch: int
    size: int
    steps: int
    guidance: float = 7.5
    runs: int = 5
    loop_runs: int = 3


@dataclass
class Row:
    name: str
    model: str
    batch: int
    size: int
    steps: int
    dtype: str
    unet_its: Optional[float] = None
    latency_p50_s: Optional[float] = None
    latency_p90_s: Optional[float] = None
    first_call_s: Optional[float] = None
    peak_memory_mb: Optional[float] = None
    tflop_per_step: Optional[float] = None
    mfu: Optional[float] = None
    runs: int = 0
    speedup: Optional[float] = None  # U-Net it/s over diffusers eager's on the same case (sdrt rows)
    skipped: Optional[str] = None
    notes: dict = field(default_factory=dict)


def gpu_peak_tflops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_TFLOPS if key in name), None)


def unet_tflop_per_step(model: str, case: Case) -> float:
    """FLOPs of one U-Net call on the CFG batch, counted on the meta device (no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    from sdrt.models.unet import UNet
    ucfg, vcfg = random_weights.unet_vae_configs(model)
    side = case.size // vcfg.downsample_factor
    n = case.batch * (2 if case.guidance > 1 else 1)
    with torch.device("meta"):
        unet = UNet(ucfg)
        x, ctx = torch.randn(n, 4, side, side), torch.randn(n, 77, ucfg.cross_attention_dim)
        t = torch.tensor(500)
        added = {}
        if model in random_weights.SDXL_CONFIGS:  # pooled text embeds and the 6 size/crop ids
            width = random_weights.SDXL_CONFIGS[model][1].projection_dim
            ids = (ucfg.projection_class_embeddings_input_dim - width) // ucfg.addition_time_embed_dim
            added = dict(text_embeds=torch.randn(n, width), time_ids=torch.randn(n, ids))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, t, ctx, **added)
    return counter.get_total_flops() / 1e12


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


class _Timer:
    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def __call__(self, fn: Callable[[], Any]) -> float:
        self.sync()
        t = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t


def measure(name: str, dtype: torch.dtype, case: Case, device: torch.device,
            e2e: Callable[[int], Any], loop: Callable[[int], Any], flops: Optional[float]) -> Row:
    """e2e(seed): token ids -> pixels; loop(seed): prompt embeddings -> latents. Both closures synchronise."""
    row = Row(name, case.model, case.batch, case.size, case.steps, str(dtype).split(".")[-1], tflop_per_step=flops)
    timer = _Timer(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row.first_call_s = timer(lambda: e2e(0))
    latencies = [timer(lambda s=s: e2e(s)) for s in range(1, case.runs + 1)]
    loops = [timer(lambda s=s: loop(s)) for s in range(case.loop_runs)]
    row.runs = case.runs
    row.latency_p50_s, row.latency_p90_s = _percentile(latencies, 50), _percentile(latencies, 90)
    row.unet_its = case.steps / statistics.median(loops)
    # the raw timings, so that repetitions of a row merge (`merge_repeats`)
    row.notes.update(first_calls_s=[row.first_call_s], latencies_s=latencies, loops_s=loops,
                     load_averages=[list(os.getloadavg())])
    if device.type == "cuda":
        row.peak_memory_mb = torch.cuda.max_memory_allocated(device) / 2**20
    peak = gpu_peak_tflops(device)
    if flops is not None and peak is not None:
        row.mfu = flops * row.unet_its / peak
    log.info("%s: %.2f it/s, p50 %.3f s", name, row.unet_its, row.latency_p50_s)
    return row


def reset_peak_rss() -> None:
    """Linux: the process's peak RSS (VmHWM) restarts from its current RSS (proc(5): clear_refs 5), after
    freed memory went back to the system (glibc keeps freed blocks otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> Optional[float]:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return next((int(ln.split()[1]) / 1024 for ln in status.splitlines() if ln.startswith("VmHWM:")), None)


def merge_repeats(rows: list[Row]) -> Row:
    """One row from repetitions of the same row: it/s over the median of every loop, latencies pooled, the
    first repetition's first call (later ones may reuse its caches), the highest peak; per-repetition figures
    in notes."""
    if len(rows) == 1 or any(r.skipped for r in rows):
        return rows[0]
    first, notes = rows[0], {k: [v for r in rows for v in r.notes.get(k, [])]
                             for k in ("first_calls_s", "latencies_s", "loops_s", "load_averages")}
    merged = Row(first.name, first.model, first.batch, first.size, first.steps, first.dtype,
                 tflop_per_step=first.tflop_per_step, first_call_s=first.first_call_s, runs=sum(r.runs for r in rows),
                 notes=dict(first.notes, **notes, repeats=len(rows), unet_its_per_repeat=[r.unet_its for r in rows]))
    merged.unet_its = first.steps / statistics.median(notes["loops_s"])
    merged.latency_p50_s = _percentile(notes["latencies_s"], 50)
    merged.latency_p90_s = _percentile(notes["latencies_s"], 90)
    peaks = [r.peak_memory_mb for r in rows if r.peak_memory_mb is not None]
    merged.peak_memory_mb = max(peaks) if peaks else None
    merged.mfu = None if first.mfu is None else first.mfu * merged.unet_its / first.unet_its
    return merged


def _ids(tokenizer, case: Case, device) -> torch.Tensor:
    prompts = ["a photograph of an astronaut riding a horse"] * case.batch
    return tokenizer([""] * case.batch + prompts).to(device)  # [uncond; cond]


def sdrt_row(backend: str, dtype: torch.dtype, case: Case, device: torch.device, flops: Optional[float],
             cuda_graphs: Optional[bool] = None) -> Row:
    from sdrt.graphs import DenoiseGraphs
    from sdrt.pipeline import from_components

    pipe = from_components(random_weights.components(case.model, device=device), backend=backend, device=device,
                           dtype=dtype, cuda_graphs=cuda_graphs)
    ids = _ids(pipe.tokenizer, case, device)
    settings = dict(steps=case.steps, guidance_scale=case.guidance, height=case.size, width=case.size)
    with torch.inference_mode():
        embeds = sdrt_prompt_inputs(pipe, ids, case.batch)

    def generate(seed: int, inputs: Optional[dict], output: str):
        with torch.inference_mode():
            inputs = sdrt_prompt_inputs(pipe, ids, case.batch) if inputs is None else inputs
            return pipe(**inputs, seed=seed, output=output, **settings)

    label = f"sdrt {backend}" + (" (graphed)" if isinstance(pipe.denoiser, DenoiseGraphs) else "")
    row = measure(label, dtype, case, device, lambda s: generate(s, None, "np"),
                  lambda s: generate(s, embeds, "latent"), flops)
    if backend == "triton":
        row.notes["vae_fp32_fallbacks"] = pipe.vae.fallbacks
    del pipe
    _free(device)
    return row


def diffusers_row(dtype: torch.dtype, case: Case, device: torch.device, flops: Optional[float],
                  compile_budget_s: Optional[float] = None, compile_mode: str = "max-autotune") -> Row:
    label = "diffusers eager" if compile_budget_s is None else "diffusers compile"
    try:
        parts = random_weights.components(case.model, device=device)
        pipe = diffusers_pipeline(parts, device, dtype)
    except ImportError as e:
        return _skipped(label, dtype, case, f"diffusers is not importable ({e})")
    del parts
    ids = _ids(random_weights.byte_tokenizer(), case, device)
    with torch.inference_mode():
        embeds = diffusers_prompt_inputs(pipe, ids, case.batch)
    settings = dict(num_inference_steps=case.steps, guidance_scale=case.guidance, height=case.size, width=case.size)

    def generate(seed: int, inputs: Optional[dict], output_type: str):
        with torch.inference_mode():
            inputs = diffusers_prompt_inputs(pipe, ids, case.batch) if inputs is None else inputs
            gen = torch.Generator("cpu").manual_seed(seed)
            return pipe(**inputs, generator=gen, output_type=output_type, **settings)

    if compile_budget_s is not None:
        pipe.unet = torch.compile(pipe.unet, mode=compile_mode, fullgraph=False)
        error = _within_budget(lambda: generate(0, embeds, "latent"), compile_budget_s)
        if error is not None:
            return _skipped(label, dtype, case, error)
    row = measure(label, dtype, case, device, lambda s: generate(s, None, "np"),
                  lambda s: generate(s, embeds, "latent"), flops)
    del pipe
    _free(device)
    return row


def _within_budget(fn: Callable[[], Any], budget_s: float) -> Optional[str]:
    """Run fn in a daemon thread; an error text when it raises or outlives the budget (it is then left
    running: inductor's compile cannot be interrupted, which is why the compile row comes last)."""
    outcome: dict = {}

    def target():
        try:
            fn()
            outcome["ok"] = True
        except Exception as e:  # torch.compile fails in many ways; the row records why
            outcome["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"

    thread = threading.Thread(target=target, daemon=True)
    start = time.perf_counter()
    thread.start()
    thread.join(budget_s)
    if thread.is_alive():
        return f"torch.compile did not finish within its {budget_s:.0f} s budget"
    if "error" in outcome:
        return f"torch.compile failed: {outcome['error']}"
    log.info("torch.compile warm-up took %.1f s", time.perf_counter() - start)
    return None


def _skipped(name: str, dtype: torch.dtype, case: Case, reason: str) -> Row:
    log.warning("%s skipped: %s", name, reason)
    return Row(name, case.model, case.batch, case.size, case.steps, str(dtype).split(".")[-1], skipped=reason)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _diffusers_available() -> Optional[str]:
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        return str(e)
    return None


def model_case(model: str, device: torch.device, steps: Optional[int], runs: Optional[int],
               size: Optional[int] = None) -> Case:
    """The main case of `model` (a random_weights name) at its native size (or `size`): batch 1, CFG (5.0 for
    SDXL, as diffusers' SDXL pipeline defaults, else 7.5); SDXL 30 steps, others 50 on CUDA; 10 on a CPU, and 3
    for a full-size config there (one U-Net call takes seconds on 2 cores: one timed loop and run)."""
    if model not in random_weights.MODELS:
        raise InvalidInputError(f"model must be one of {', '.join('random:' + m for m in random_weights.MODELS)}, "
                                f"got {'random:' + model!r}")
    ucfg, vcfg = random_weights.unet_vae_configs(model)
    sdxl = model in random_weights.SDXL_CONFIGS
    full_size_cpu = device.type != "cuda" and not model.startswith("tiny")
    default_steps = (3 if full_size_cpu else 10) if device.type != "cuda" else 30 if sdxl else 50
    default_runs = 1 if full_size_cpu else 3 if device.type == "cuda" and sdxl else 5
    return Case(model, 1, size or ucfg.sample_size * vcfg.downsample_factor, steps or default_steps,
                guidance=5.0 if sdxl else 7.5, runs=runs or default_runs, loop_runs=1 if full_size_cpu else 3)


def run_bench(device: torch.device, *, steps: Optional[int] = None, runs: Optional[int] = None,
              compile_budget_s: float = 180.0, compile_mode: str = "max-autotune", secondary: bool = True,
              rows: Optional[set[str]] = None, on_row: Optional[Callable[[dict], None]] = None,
              model: Optional[str] = None, size: Optional[int] = None, repeats: Optional[int] = None) -> dict:
    """All rows for `device`; `rows` limits them by name prefix (e.g. {"sdrt", "diffusers eager"}).
    `model`: a random_weights name for the main rows instead of the device's default (then no secondary rows);
    `size`: its image side. repeats: how many times the main rows run, interleaved (default 1; 2 on a CPU for
    full-size configs). `on_row(result so far)` is called after every row, so a run killed midway still leaves
    its rows."""
    device = torch.device(device)
    want = (lambda name: True) if rows is None else (lambda name: any(name.startswith(r) for r in rows))
    missing = _diffusers_available()
    if model is not None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        main, extra = model_case(model, device, steps, runs, size), []
    elif device.type == "cuda":
        dtype = torch.float16
        main = Case("sd15", 1, size or 512, steps or 50, runs=runs or 5)
        # secondary rows at 20 steps, 2 runs: it/s per step is what they report, and at 50 steps and 3 runs
        # they alone took about 3 minutes of an H100 (estimated), more than the suite's bench step can spare
        extra = [Case("sd15", 4, 512, steps or 20, runs=min(runs or 2, 2), loop_runs=1),
                 Case("sd21", 1, 768, steps or 20, runs=min(runs or 2, 2), loop_runs=1)] if secondary else []
    else:
        dtype = torch.float32
        main = Case("tiny", 1, size or 16, steps or 10, runs=runs or 5)
        extra = []
    repeats = repeats or (2 if device.type != "cuda" and not main.model.startswith("tiny") else 1)
    flops = {id(c): unet_tflop_per_step(c.model, c) for c in [main, *extra]}

    main_plan: list[tuple[str, Callable[[], Row]]] = [("sdrt torch", lambda: sdrt_row("torch", dtype, main, device,
                                                                                      flops[id(main)]))]
    if device.type == "cuda":
        main_plan.append(("sdrt triton", lambda: sdrt_row("triton", dtype, main, device, flops[id(main)])))
    main_plan.append(("diffusers eager", lambda: diffusers_row(dtype, main, device, flops[id(main)])))
    if device.type == "cpu" and main.model not in random_weights.SDXL_CONFIGS:
        main_plan += [(f"sdrt {b}", lambda b=b: sdrt_row(b, dtype, main, device, flops[id(main)]))
                      for b in CPU_EXPORTED_BACKENDS]
    plan = main_plan * repeats
    for case in extra:
        plan.append(("sdrt triton", lambda c=case: sdrt_row("triton", dtype, c, device, flops[id(c)])))
        plan.append(("diffusers eager", lambda c=case: diffusers_row(dtype, c, device, flops[id(c)])))
    if device.type == "cuda":
        plan.append(("diffusers compile", lambda: diffusers_row(dtype, main, device, flops[id(main)],
                                                                compile_budget_s=compile_budget_s,
                                                                compile_mode=compile_mode)))
    done: list[list[Row]] = []  # repetitions of one row (same name and case) stay together, in first-run order
    for name, make in plan:
        if not want(name):
            continue
        if name.startswith("diffusers") and missing is not None:
            row = _skipped(name, dtype, main, f"diffusers is not importable ({missing})")
        else:
            if device.type == "cpu":
                reset_peak_rss()
            try:
                row = make()
            except torch.cuda.OutOfMemoryError as e:
                row = _skipped(name, dtype, main, f"out of memory: {' '.join(str(e).split())[:200]}")
                _free(device)
            except BackendUnavailableError as e:  # a CPU row whose package is not installed
                row = _skipped(name, dtype, main, str(e))
            if device.type == "cpu" and not row.skipped:
                row.peak_memory_mb = peak_rss_mb()
        same = next((g for g in done if (g[0].name, g[0].model, g[0].batch, g[0].size) ==
                     (row.name, row.model, row.batch, row.size)), None)
        if same is None:
            done.append([row])
        elif not same[0].skipped:  # a row skipped once (missing package) is not run again
            same.append(row)
        if on_row is not None:
            on_row(_result(device, dtype, [merge_repeats(g) for g in done], complete=False))
    return _result(device, dtype, [merge_repeats(g) for g in done], complete=True)


def _result(device: torch.device, dtype: torch.dtype, rows: list[Row], complete: bool) -> dict:
    ratios = speedups(rows)
    for row in rows:
        row.speedup = ratios.get(f"{row.name} / diffusers eager") if row.model == rows[0].model else None
    return dict(device=_device_name(device), torch=torch.__version__, dtype=str(dtype).split(".")[-1],
                peak_tflops=gpu_peak_tflops(device), complete=complete, load_average=list(os.getloadavg()),
                rows=[asdict(r) for r in rows], speedups=ratios)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        name = next(ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"cpu ({name}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def speedups(rows: list[Row]) -> dict:
    """U-Net it/s of each sdrt row over each diffusers row, on the main case (the first row's)."""
    if not rows:
        return {}
    main = (rows[0].model, rows[0].batch, rows[0].size)
    same = [r for r in rows if (r.model, r.batch, r.size) == main and r.unet_its]
    return {f"{ours.name} / {r.name}": ours.unet_its / r.unet_its for ours in same if ours.name.startswith("sdrt")
            for r in same if r.name.startswith("diffusers")}
