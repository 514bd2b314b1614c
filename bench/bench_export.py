"""Time and peak memory of the ONNX export of a full-size model (SD 1.5 config, random weights, fp32).

    python -m sdrt.bench.bench_export --out bench/results [--model sd15] [--dir DIR]

Builds the random-weight components in this process, then runs `sdrt.export.onnx.export_onnx` into --dir
(default: a temporary folder, removed after) with `force=True`, so the figure is a full export, never a cache
hit. Peak memory is the process's peak resident set size (`ru_maxrss`), before the export (the model in memory)
and after (the model plus the exporter's own peak). Writes export-<model>-<date>.json into --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--model", default="sd15")
    p.add_argument("--dir", type=Path, default=None, help="export folder to keep (default: temporary, removed)")
    args = p.parse_args()

    import torch

    from sdrt.export.onnx import export_onnx
    from sdrt.models import random_weights

    start = time.perf_counter()
    components = random_weights.components(args.model)
    build_s = time.perf_counter() - start
    before_mb = peak_rss_mb()
    target = args.dir or Path(tempfile.mkdtemp(prefix="sdrt-export-")) / "export"
    start = time.perf_counter()
    export = export_onnx(components, target, force=True)
    export_s = time.perf_counter() - start
    files = {f: info["bytes"] for c in export.manifest["components"].values() for f, info in c["files"].items()}
    result = dict(model=args.model, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                          f"torch {torch.__version__}, {torch.get_num_threads()} threads",
                  build_s=round(build_s, 1), export_s=round(export_s, 1),
                  peak_rss_mb_before_export=round(before_mb), peak_rss_mb=round(peak_rss_mb()),
                  load_average=os.getloadavg(), file_bytes=files, total_gb=round(sum(files.values()) / 1e9, 2))
    print(json.dumps(result, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"export-{args.model}-{result['date'][:10]}.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.dir is None:
        shutil.rmtree(target.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
