"""Time switching from LoRA A to LoRA B on the SD 1.5 U-Net: sdrt against diffusers, in one run.

    python -m sdrt.bench.bench_lora --out bench/results [--rank 32] [--repeats 3]

Random SD 1.5 weights (`sdrt.models.random_weights`, fp32, CPU) and two random kohya LoRA files (fp16, LoCon:
rank `--rank` on every attention projection, feed-forward and transformer in/out projection and every conv of
the U-Net). A switch, file read included on both sides:
  - sdrt:      pipe.unload_lora("A"); pipe.load_lora(B)
  - diffusers: pipe.unfuse_lora(); pipe.unload_lora_weights(); pipe.load_lora_weights(B); pipe.fuse_lora()
    (unfuse first: unloading a fused LoRA does not take its delta out of the weights)
Each side alternates A -> B -> A ... `--repeats` times after one untimed load; the median is reported. The two
sides run one after the other (each model is 3.4 GB) in the same process. Writes lora-<date>.json into --out.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


def write_lora(path: Path, unet: nn.Module, rank: int, seed: int) -> int:
    """A kohya LoRA file on every attention, feed-forward and conv layer of `unet`; returns its layer count."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, m in unet.named_modules():
        if isinstance(m, nn.Conv2d):
            down, up = torch.randn(rank, m.in_channels, *m.kernel_size, generator=g), torch.randn(m.out_channels, rank, 1, 1, generator=g)
        elif isinstance(m, nn.Linear) and ".attentions." in name:
            down, up = torch.randn(rank, m.in_features, generator=g), torch.randn(m.out_features, rank, generator=g)
        else:
            continue
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = (down * 0.01).half()
        tensors[f"{key}.lora_up.weight"] = (up * 0.01).half()
        tensors[f"{key}.alpha"] = torch.tensor(float(rank)).half()
    save_file(tensors, str(path))
    return len(tensors) // 3


def time_switches(switch, files: list[Path], repeats: int) -> list[float]:
    times = []
    for i in range(repeats):
        gc.collect()
        start = time.perf_counter()
        switch(files[i % 2], files[(i + 1) % 2])
        times.append(time.perf_counter() - start)
    return times


def bench_sdrt(files: list[Path], repeats: int) -> dict:
    from sdrt.models.random_weights import components
    from sdrt.pipeline import from_components

    pipe = from_components(components("sd15"), device="cpu", dtype="float32")
    pipe.load_lora(files[0], name=files[0].stem)

    def switch(old: Path, new: Path) -> None:
        pipe.unload_lora(old.stem)
        pipe.load_lora(new, name=new.stem)

    def batched(old: Path, new: Path) -> None:
        with pipe.batch_lora_changes():
            switch(old, new)

    times = time_switches(switch, files, repeats)
    batched_times = time_switches(batched, files[repeats % 2:] + files[:repeats % 2], repeats)
    start = time.perf_counter()
    pipe.set_lora_scale(next(iter(pipe.loras)), 0.5)
    rescale = time.perf_counter() - start
    # the floor of any in-place switch: one pass writing every touched weight from its kept original
    fuser = pipe._lora_fuser
    start = time.perf_counter()
    for name, original in fuser._originals.items():
        fuser._targets[name].weight.copy_(original)
    floor = time.perf_counter() - start
    return {"switch_s": times, "median_s": statistics.median(times),
            "batched_switch_s": batched_times, "batched_median_s": statistics.median(batched_times),
            "set_lora_scale_s": rescale, "copy_touched_weights_once_s": floor}


def bench_diffusers(files: list[Path], repeats: int) -> dict:
    from sdrt.bench.models import diffusers_pipeline
    from sdrt.models.random_weights import components

    parts = components("sd15")
    pipe = diffusers_pipeline(parts, "cpu", torch.float32)
    del parts
    gc.collect()
    pipe.load_lora_weights(str(files[0]), adapter_name=files[0].stem)
    pipe.fuse_lora()

    def switch(old: Path, new: Path) -> None:
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
        pipe.load_lora_weights(str(new), adapter_name=new.stem)
        pipe.fuse_lora()

    times = time_switches(switch, files, repeats)
    return {"switch_s": times, "median_s": statistics.median(times)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    from sdrt.config import UNetConfig
    from sdrt.models.unet import UNet

    with tempfile.TemporaryDirectory(prefix="sdrt-bench-lora-") as tmp:
        with torch.device("meta"):
            shapes = UNet(UNetConfig())  # names and shapes only
        files = [Path(tmp) / "A.safetensors", Path(tmp) / "B.safetensors"]
        layers = [write_lora(f, shapes, args.rank, seed) for seed, f in enumerate(files)]
        size = files[0].stat().st_size
        ours = bench_sdrt(files, args.repeats)
        gc.collect()
        theirs = bench_diffusers(files, args.repeats)
    import diffusers
    import peft
    result = {
        "benchmark": "switch LoRA A -> B on the SD 1.5 U-Net (random fp32 weights, CPU), file read included",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU" if not torch.cuda.is_available()
                   else f"{platform.machine()}, {torch.cuda.get_device_name()}",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__},
        "lora": {"rank": args.rank, "layers": layers[0], "file_bytes": size, "format": "kohya LoCon, fp16"},
        "repeats": args.repeats,
        "sdrt": ours, "diffusers": theirs,
        "speedup": theirs["median_s"] / ours["median_s"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"lora-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"switch A -> B: sdrt {ours['median_s']:.3f} s, diffusers {theirs['median_s']:.3f} s "
          f"({result['speedup']:.1f}x); set_lora_scale {ours['set_lora_scale_s']:.3f} s -> {out}")


if __name__ == "__main__":
    main()
