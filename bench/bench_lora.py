"""Time switching from LoRA A to LoRA B on the SD 1.5 U-Net: sdrt against diffusers, in one run.

    python -m sdrt.bench.bench_lora --out bench/results [--rank 32] [--repeats 3]

Random SD 1.5 weights (`sdrt.models.random_weights`, fp32, CPU) and two random kohya LoRA files (fp16, LoCon:
rank `--rank` on every attention projection, feed-forward and transformer in/out projection and every conv of
the U-Net). A switch:
  - sdrt:      pipe.unload_lora("A"); pipe.load_lora(B), B seen before (its parsed file cached, as on a
               service switching among its LoRAs); `sdrt_cold`: the cache cleared first, so B's file is read
               and checked again; `sdrt_cold_batched`: the same inside pipe.batch_lora_changes()
  - diffusers: pipe.unfuse_lora(); pipe.unload_lora_weights(); pipe.load_lora_weights(B); pipe.fuse_lora()
    (unfuse first: unloading a fused LoRA does not take its delta out of the weights; file read every time)
Both pipelines are in memory (about 12 GB together) and each repeat runs every side once, in turn, so the load
of a shared machine falls on all alike; each side alternates A -> B -> A ...; medians are reported, with the
1-minute load average after each switch. Writes lora-<date>.json into --out.
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
from typing import Callable

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


class Side:
    """One side of the comparison: a pipeline with one of two LoRA files fused, and how it switches."""

    def __init__(self, name: str, switch: Callable[[Path, Path], None], files: list[Path], state: dict):
        self.name, self._switch, self.files, self.state = name, switch, files, state  # state: which file is fused
        self.times: list[float] = []
        self.loads: list[float] = []

    def switch(self, timed: bool = True) -> None:
        old, new = self.files[self.state["current"]], self.files[1 - self.state["current"]]
        gc.collect()
        start = time.perf_counter()
        self._switch(old, new)
        elapsed = time.perf_counter() - start
        self.state["current"] = 1 - self.state["current"]
        if timed:
            self.times.append(elapsed)
            self.loads.append(os.getloadavg()[0])

    def summary(self) -> dict:
        return {"switch_s": self.times, "median_s": statistics.median(self.times), "loadavg_1min": self.loads}


def sdrt_sides(parts, files: list[Path]) -> tuple[list[Side], object]:
    """sdrt's switches: file parsed before (a service switching among its LoRAs), cold (cache cleared: file read
    and checked again), and cold inside batch_lora_changes() (each weight written once)."""
    from sdrt.pipeline import from_components

    pipe = from_components(parts, device="cpu", dtype="float32")
    pipe.load_lora(files[0], name=files[0].stem)

    def warm(old: Path, new: Path) -> None:
        pipe.unload_lora(old.stem)
        pipe.load_lora(new, name=new.stem)

    def cold(old: Path, new: Path) -> None:
        pipe._lora_cache.clear()
        warm(old, new)

    def batched(old: Path, new: Path) -> None:
        with pipe.batch_lora_changes():
            cold(old, new)

    state = {"current": 0}  # one pipeline under the three
    return [Side("sdrt", warm, files, state), Side("sdrt_cold", cold, files, state),
            Side("sdrt_cold_batched", batched, files, state)], pipe


def diffusers_side(parts, files: list[Path]) -> tuple[Side, object]:
    from sdrt.bench.models import diffusers_pipeline

    pipe = diffusers_pipeline(parts, "cpu", torch.float32)
    pipe.load_lora_weights(str(files[0]), adapter_name=files[0].stem)
    pipe.fuse_lora()

    def switch(old: Path, new: Path) -> None:
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
        pipe.load_lora_weights(str(new), adapter_name=new.stem)
        pipe.fuse_lora()

    return Side("diffusers", switch, files, {"current": 0}), pipe


def run(files: list[Path], repeats: int) -> dict:
    """Both pipelines in memory; each repeat switches every side once, in turn, so load on the shared machine
    falls on both alike. One untimed switch there and back first (first writes fault the pages in)."""
    from sdrt.models.random_weights import components

    parts = components("sd15")
    diffusers, _dpipe = diffusers_side(parts, files)
    sides, pipe = sdrt_sides(parts, files)
    del parts
    gc.collect()
    for side in sides[:1] + [diffusers]:
        side.switch(timed=False)
        side.switch(timed=False)
    for _ in range(repeats):
        for side in sides + [diffusers]:
            side.switch()
    start = time.perf_counter()
    pipe.set_lora_scale(next(iter(pipe.loras)), 0.5)
    rescale = time.perf_counter() - start
    # the floor of any in-place switch: one pass writing every touched weight from its kept original
    fuser = pipe._lora_fuser
    start = time.perf_counter()
    for name, original in fuser._originals.items():
        fuser._targets[name].weight.copy_(original)
    floor = time.perf_counter() - start
    out = {side.name: side.summary() for side in sides + [diffusers]}
    out["sdrt"].update(set_lora_scale_s=rescale, copy_touched_weights_once_s=floor)
    return out


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
        sides = run(files, args.repeats)
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
        **sides,
        "speedup": sides["diffusers"]["median_s"] / sides["sdrt"]["median_s"],
        "speedup_cold": sides["diffusers"]["median_s"] / sides["sdrt_cold"]["median_s"],
        "speedup_cold_batched": sides["diffusers"]["median_s"] / sides["sdrt_cold_batched"]["median_s"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"lora-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"switch A -> B (medians): sdrt {sides['sdrt']['median_s']:.3f} s (file parsed before), "
          f"{sides['sdrt_cold']['median_s']:.3f} s cold, {sides['sdrt_cold_batched']['median_s']:.3f} s cold batched; "
          f"diffusers {sides['diffusers']['median_s']:.3f} s; speedup {result['speedup']:.1f}x "
          f"({result['speedup_cold']:.1f}x cold) -> {out}")


if __name__ == "__main__":
    main()
