"""The side-by-side results as a terminal table, a JSON file and a PNG bar chart."""
from __future__ import annotations

import datetime
import json
import re
from pathlib import Path
from typing import Optional

COLUMNS = (("row", "name", "{}", 26), ("model", "model", "{}", 9), ("batch", "batch", "{}", 5),
           ("size", "size", "{}", 5), ("steps", "steps", "{}", 5), ("U-Net it/s", "unet_its", "{:.2f}", 10),
           ("p50 s", "latency_p50_s", "{:.3f}", 8), ("p90 s", "latency_p90_s", "{:.3f}", 8),
           ("1st call s", "first_call_s", "{:.1f}", 10), ("peak MB", "peak_memory_mb", "{:.0f}", 8),
           ("TFLOP/step", "tflop_per_step", "{:.4g}", 10), ("MFU", "mfu", "{:.1%}", 6),
           ("vs diffusers", "speedup", "{:.2f}x", 12))


def table(result: dict) -> str:
    lines = [f"sdrt bench on {result['device']} (torch {result['torch']}, {result['dtype']})",
             " ".join(f"{title:>{w}}" if i else f"{title:<{w}}" for i, (title, _, _, w) in enumerate(COLUMNS))]
    for row in result["rows"]:
        cells = []
        for i, (_, key, fmt, w) in enumerate(COLUMNS):
            value = row.get(key)
            text = "-" if value is None else fmt.format(value)
            cells.append(f"{text:<{w}}" if i == 0 else f"{text:>{w}}")
        line = " ".join(cells)
        if row.get("skipped"):
            line = f"{row['name']:<26} skipped: {row['skipped']}"
        lines.append(line)
    for label, ratio in result.get("speedups", {}).items():
        lines.append(f"speedup (U-Net it/s) {label}: {ratio:.2f}x")
    return "\n".join(lines)


def new_stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def write_json(result: dict, out_dir: Path, stamp: str) -> Path:
    """bench-<device>-<stamp>.json in out_dir, replaced atomically (rewritten after every row)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    result = dict(result, date=now.isoformat(timespec="seconds"))
    json_path = _base(result, out_dir, stamp).with_suffix(".json")
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(json_path)
    return json_path


def write(result: dict, out_dir: Path, stamp: Optional[str] = None) -> tuple[Path, Optional[Path]]:
    """bench-<device>-<stamp>.json and .png in out_dir; the PNG is None when matplotlib is missing."""
    stamp = stamp or new_stamp()
    json_path = write_json(result, out_dir, stamp)
    return json_path, plot(result, _base(result, out_dir, stamp).with_suffix(".png"))


def _base(result: dict, out_dir: Path, stamp: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", result["device"].lower()).strip("-")[:40]
    return out_dir / f"bench-{slug}-{stamp}"


def plot(result: dict, path: Path) -> Optional[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in result["rows"] if not r.get("skipped")]
    labels = [f"{r['name']}\n{r['model']} b{r['batch']} {r['size']}px" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows) + 4), 4.5))
    for ax, key, title in ((axes[0], "unet_its", "U-Net it/s (higher is better)"),
                           (axes[1], "latency_p50_s", "end-to-end p50 latency, s (lower is better)")):
        values = [r[key] or 0 for r in rows]
        colors = ["tab:orange" if r["name"].startswith("sdrt") else "tab:blue" for r in rows]
        bars = ax.bar(range(len(rows)), values, color=colors)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"sdrt bench: {result['device']}, {result['dtype']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
