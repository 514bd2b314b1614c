"""Time loading a full-size SD 1.5 diffusers folder: sdrt against diffusers + transformers.

    python -m sdrt.bench.bench_load --out bench/results [--model-dir DIR]

Writes a random-weight folder with the SD 1.5 architecture (UNet2DConditionModel(), the SD VAE,
the ViT-L/14 CLIP text tower; fp32 safetensors, about 4.3 GB) to a temporary folder, or reuses
--model-dir when it already holds one. Then times, in the same process, best of 3 each, on a warm page
cache (the folder was just written or read, so this measures loading, not the disk):
  - sdrt: `load_components(folder)` (tokenizer, text encoder, U-Net, VAE, scheduler config) and each
    component alone with `load_component`;
  - reference: diffusers `UNet2DConditionModel.from_pretrained` + `AutoencoderKL.from_pretrained` +
    transformers `CLIPTextModel.from_pretrained`, with their default options.
sdrt memory-maps the safetensors files and assigns the tensors, so its weights are read when first used;
the "load + read" column adds one pass over every weight (a sum) to both sides for a like-for-like figure.
Prints a table and writes load-<date>.json into --out.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

REPEATS = 3


def write_sd15_folder(root: Path) -> None:
    """A random-weight SD 1.5-architecture folder (no tokenizer files: sdrt's loader gets the shared ones)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae_config = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                      norm_num_groups=32, sample_size=512)
    clip_config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                 projection_dim=768)
    for name, build in (("unet", lambda: UNet2DConditionModel()), ("vae", lambda: AutoencoderKL(**vae_config)),
                        ("text_encoder", lambda: CLIPTextModel(clip_config))):
        # built on meta and filled with cheap random values: a real init of 1B parameters takes minutes on 2 cores
        with torch.device("meta"):
            model = build()
        model = model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.uniform_(-0.02, 0.02)
        model.save_pretrained(str(root / name))
        del model
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    scheduler = root / "scheduler"
    scheduler.mkdir(exist_ok=True)
    from sdrt.components import SD_SCHEDULER_CONFIG
    (scheduler / "scheduler_config.json").write_text(json.dumps(SD_SCHEDULER_CONFIG))
    tokenizer = root / "tokenizer"
    tokenizer.mkdir(exist_ok=True)
    shared = Path(__file__).resolve().parents[2] / "shared" / "clip-tokenizer"
    for name in ("vocab.json", "merges.txt"):
        (tokenizer / name).write_bytes((shared / name).read_bytes())


def best_of(fn: Callable[[], object], read: bool) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        gc.collect()
        start = time.perf_counter()
        loaded = fn()
        if read:
            modules = loaded if isinstance(loaded, tuple) else (loaded,)
            for m in modules:
                for t in m.state_dict().values():
                    t.sum()
        best = min(best, time.perf_counter() - start)
        del loaded
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="where to write (or find) the SD 1.5 folder; default: a temporary folder")
    args = parser.parse_args()

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from sdrt.components import load_component, load_components

    with tempfile.TemporaryDirectory() as tmp:
        root = args.model_dir or Path(tmp) / "sd15"
        if not (root / "model_index.json").is_file():
            start = time.perf_counter()
            write_sd15_folder(root)
            print(f"wrote {root} in {time.perf_counter() - start:.0f} s")
        size = sum(f.stat().st_size for f in root.rglob("*.safetensors"))

        cases = {
            "unet": (lambda: load_component(root / "unet", "unet"),
                     lambda: UNet2DConditionModel.from_pretrained(str(root / "unet"))),
            "vae": (lambda: load_component(root / "vae", "vae"),
                    lambda: AutoencoderKL.from_pretrained(str(root / "vae"))),
            "text_encoder": (lambda: load_component(root / "text_encoder", "text_encoder"),
                             lambda: CLIPTextModel.from_pretrained(str(root / "text_encoder"))),
            "all": (lambda: (lambda c: (c.unet, c.vae, c.text_encoder))(load_components(root)),
                    lambda: (UNet2DConditionModel.from_pretrained(str(root / "unet")),
                             AutoencoderKL.from_pretrained(str(root / "vae")),
                             CLIPTextModel.from_pretrained(str(root / "text_encoder")))),
        }
        # one untimed pass warms the page cache and the imports
        for ours, theirs in cases.values():
            ours(), theirs()
        results = {}
        for name, (ours, theirs) in cases.items():
            results[name] = {"sdrt_s": best_of(ours, False), "reference_s": best_of(theirs, False),
                             "sdrt_read_s": best_of(ours, True), "reference_read_s": best_of(theirs, True)}

    import diffusers
    import transformers
    print(f"SD 1.5 fp32 folder, {size / 1e9:.2f} GB of safetensors; best of {REPEATS}, page cache warm; "
          f"{os.cpu_count()} CPUs")
    print(f"{'component':<14}{'sdrt':>10}{'reference':>12}{'sdrt+read':>12}{'ref+read':>12}")
    for name, r in results.items():
        print(f"{name:<14}{r['sdrt_s']:>9.3f}s{r['reference_s']:>11.3f}s{r['sdrt_read_s']:>11.3f}s"
              f"{r['reference_read_s']:>11.3f}s")
    print("reference = diffusers/transformers from_pretrained (all: U-Net + VAE + text encoder; "
          "sdrt's 'all' also builds the tokenizer)")

    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"load-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps({
        "benchmark": "load SD 1.5 fp32 diffusers folder (random weights)", "repeats": REPEATS, "cache": "warm",
        "bytes": size, "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
