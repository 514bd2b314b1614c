"""Benchmark the Triton kernels against torch at SD 1.5 512x512 shapes (batch 2 for classifier-free guidance).

    python -m sdrt.bench.bench_kernels --output-dir bench/results

GroupNorm+SiLU (fp16, channels-last) against F.group_norm followed by F.silu, with the effective memory
bandwidth (x read once + y written once, the least traffic any implementation needs); attention (fp16,
q/k/v as transposed views of [B, L, H, D]) against scaled_dot_product_attention with each of its
backends, with TFLOP/s (4 * B * H * Lq * Lk * D flops). Times are medians from triton.testing.do_bench.
Writes kernels-<device>-<date>.json into the output folder. Needs a CUDA GPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

# (name, [N, C, H, W]): U-Net resnet norms at 64/32/16/8 latent pixels, and the VAE decoder's largest norm.
GROUP_NORM_CASES = [
    ("unet 320@64x64", (2, 320, 64, 64)),
    ("unet 960@64x64 (up)", (2, 960, 64, 64)),
    ("unet 640@32x32", (2, 640, 32, 32)),
    ("unet 1280@16x16", (2, 1280, 16, 16)),
    ("unet 2560@8x8 (up)", (2, 2560, 8, 8)),
    ("vae 512@64x64", (1, 512, 64, 64)),
    ("vae 128@512x512", (1, 128, 512, 512)),
]
# (name, B, H, Lq, Lk, D): U-Net self-attention at 64/32/16/8 latent pixels and cross-attention on 77 tokens.
ATTENTION_CASES = [
    ("self 4096 d40", 2, 8, 4096, 4096, 40),
    ("cross 4096x77 d40", 2, 8, 4096, 77, 40),
    ("self 1024 d80", 2, 8, 1024, 1024, 80),
    ("cross 1024x77 d80", 2, 8, 1024, 77, 80),
    ("self 256 d160", 2, 8, 256, 256, 160),
    ("cross 256x77 d160", 2, 8, 256, 77, 160),
    ("self 64 d160", 2, 8, 64, 64, 160),
    ("self 16384 d40 (1024x1024)", 2, 8, 16384, 16384, 40),
]


def _bench_ms(fn) -> float:
    import triton.testing

    fn()  # compile / autotune outside the timed runs
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench_group_norm(dtype: torch.dtype) -> list[dict]:
    import sdrt.kernels

    rows = []
    for name, shape in GROUP_NORM_CASES:
        x = torch.randn(shape, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
        weight = torch.randn(shape[1], device="cuda", dtype=dtype)
        bias = torch.randn(shape[1], device="cuda", dtype=dtype)
        ours = lambda: sdrt.kernels.group_norm(x, 32, weight, bias, eps=1e-6, silu=True)  # noqa: E731
        theirs = lambda: F.silu(F.group_norm(x, 32, weight, bias, 1e-6))  # noqa: E731
        max_abs_diff = (ours().float() - theirs().float()).abs().max().item()
        triton_ms, torch_ms = _bench_ms(ours), _bench_ms(theirs)
        traffic = 2 * x.numel() * x.element_size()
        rows.append(dict(name=name, shape=list(shape), triton_ms=triton_ms, torch_ms=torch_ms,
                         speedup=torch_ms / triton_ms,
                         triton_gb_per_s=traffic / triton_ms / 1e6, torch_gb_per_s=traffic / torch_ms / 1e6,
                         max_abs_diff_vs_torch=max_abs_diff))
    return rows


def _sdpa_backends() -> dict:
    from torch.nn.attention import SDPBackend

    names = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"]
    return {n.lower(): getattr(SDPBackend, n) for n in names if hasattr(SDPBackend, n)}


def bench_attention(dtype: torch.dtype) -> list[dict]:
    from torch.nn.attention import sdpa_kernel

    import sdrt.kernels

    rows = []
    for name, b, h, lq, lk, d in ATTENTION_CASES:
        q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=dtype).transpose(1, 2) for n in (lq, lk, lk))
        flops = 4 * b * h * lq * lk * d
        ours = lambda: sdrt.kernels.attention(q, k, v)  # noqa: E731
        triton_ms = _bench_ms(ours)
        sdpa_ms = {}
        for backend_name, backend in _sdpa_backends().items():
            try:
                with sdpa_kernel(backend):  # entered once, so its cost stays out of the timed calls
                    sdpa_ms[backend_name] = _bench_ms(lambda: F.scaled_dot_product_attention(q, k, v))
            except (RuntimeError, torch.cuda.OutOfMemoryError):  # backend refuses this shape/dtype
                sdpa_ms[backend_name] = None
        measured = {n: ms for n, ms in sdpa_ms.items() if ms is not None}
        best = min(measured, key=measured.get)
        max_abs_diff = (ours().float() - F.scaled_dot_product_attention(q, k, v).float()).abs().max().item()
        rows.append(dict(name=name, batch=b, heads=h, lq=lq, lk=lk, head_dim=d, triton_ms=triton_ms,
                         sdpa_ms=sdpa_ms, sdpa_best_backend=best, sdpa_best_ms=measured[best],
                         speedup_vs_best_sdpa=measured[best] / triton_ms,
                         triton_tflops=flops / triton_ms / 1e9, sdpa_best_tflops=flops / measured[best] / 1e9,
                         max_abs_diff_vs_sdpa=max_abs_diff))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, required=True, help="folder for the JSON results")
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA GPU found; the kernel benchmark runs only on CUDA", file=sys.stderr)
        return 2
    import triton

    dtype = getattr(torch, args.dtype)
    device = torch.cuda.get_device_name()
    now = datetime.datetime.now(datetime.timezone.utc)
    result = dict(device=device, date=now.isoformat(timespec="seconds"), dtype=args.dtype,
                  torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                  group_norm_silu=bench_group_norm(dtype), attention=bench_attention(dtype))

    print(f"{device}, {args.dtype}")
    print(f"{'group_norm+silu':34} {'triton ms':>10} {'torch ms':>10} {'speedup':>8} {'triton GB/s':>12}")
    for r in result["group_norm_silu"]:
        print(f"{r['name']:34} {r['triton_ms']:10.4f} {r['torch_ms']:10.4f} {r['speedup']:8.2f} "
              f"{r['triton_gb_per_s']:12.0f}")
    print(f"{'attention':34} {'triton ms':>10} {'best sdpa':>10} {'speedup':>8} {'triton TF/s':>12} {'sdpa backend':>20}")
    for r in result["attention"]:
        print(f"{r['name']:34} {r['triton_ms']:10.4f} {r['sdpa_best_ms']:10.4f} {r['speedup_vs_best_sdpa']:8.2f} "
              f"{r['triton_tflops']:12.1f} {r['sdpa_best_backend']:>20}")

    args.output_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    path = args.output_dir / f"kernels-{slug}-{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
