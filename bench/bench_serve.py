"""`python -m sdrt.bench.bench_serve`: what dynamic batching buys `sdrt serve`, and how it takes overload.

Loopback only, bounded in requests and time. On the bundled tiny model (or --model), in one run:
  1. batched:   a server with --max-batch 8; `--clients` closed-loop clients, `--requests` each (txt2img)
  2. unbatched: the same with --max-batch 1
  3. overload:  a server with --queue 8; `--overload-clients` clients at once, one request each: every
                answer must be 200 or 503 (none lost or hung), and the server must be alive after
Throughput (images/s) and p50/p99 latency per run; the goal is batched >= 1.5x unbatched throughput.
Writes JSON (machine, date, settings, results) to bench/results/serve-DATE.json. On a machine others use
at the same time the figures are noisy: the JSON records the load average before and after.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import httpx

from sdrt.bench.serve_process import ServerProcess

RESULTS = Path(__file__).resolve().parent / "results"
GOAL = 1.5


def _payload(client: int, index: int, steps: int) -> dict:
    colors = ("red", "green", "blue", "yellow", "white", "black")
    return {"prompt": f"a {colors[client % 6]} circle on a {colors[(client + index + 1) % 6]} background",
            "seed": 1000 * client + index, "steps": steps, "cfg_scale": 5.0 + client % 3, "sampler_name": "Euler a"}


def _percentile(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def closed_loop(server: ServerProcess, clients: int, requests: int, steps: int, deadline: float) -> dict:
    """`clients` threads, each sending `requests` txt2img requests one after another."""
    def client(c: int) -> list[tuple[int, float]]:
        out = []
        with httpx.Client(timeout=max(1.0, deadline - time.monotonic())) as http:
            for i in range(requests):
                if time.monotonic() > deadline:
                    break
                start = time.monotonic()
                status = http.post(f"{server.url}/sdapi/v1/txt2img", json=_payload(c, i, steps)).status_code
                out.append((status, time.monotonic() - start))
        return out

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        answers = [a for per_client in pool.map(client, range(clients)) for a in per_client]
    wall = time.monotonic() - start
    latencies = [s for status, s in answers if status == 200]
    return {"requests": len(answers), "ok": len(latencies), "wall_s": round(wall, 3),
            "images_per_s": round(len(latencies) / wall, 4) if wall else None,
            "latency_p50_s": _percentile(latencies, 0.5), "latency_p99_s": _percentile(latencies, 0.99),
            "latency_mean_s": round(statistics.fmean(latencies), 4) if latencies else None}


def overload(server: ServerProcess, clients: int, steps: int, timeout: float) -> dict:
    """`clients` requests at once against a small queue: each must be answered 200 or 503."""
    def one(c: int) -> str:
        try:
            return str(httpx.post(f"{server.url}/sdapi/v1/txt2img", json=_payload(c, 0, steps),
                                  timeout=timeout).status_code)
        except httpx.TimeoutException:
            return "hung"
        except httpx.HTTPError as e:
            return f"lost ({type(e).__name__})"

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        outcomes = list(pool.map(one, range(clients)))
    counts = {k: outcomes.count(k) for k in sorted(set(outcomes))}
    alive = server.health() == "ready"
    return {"clients": clients, "answers": counts, "alive_after": alive,
            "ok": alive and set(counts) <= {"200", "503"} and counts.get("200", 0) > 0}


def _machine() -> dict:
    import torch
    return {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=4, help="per client (default 4)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--overload-clients", type=int, default=64)
    p.add_argument("--max-seconds", type=float, default=900, help="time budget of each closed-loop run")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--ray", action="store_true", help="sdrt serve --ray with 1 and 2 replicas instead")
    args = p.parse_args(argv)
    common = [] if args.model is None else ["--model", args.model]
    common += [] if args.device is None else ["--device", args.device]
    if args.ray:
        from sdrt.bench import bench_serve_ray
        return bench_serve_ray.main(args, common)
    runs = {}
    load_before = os.getloadavg()
    for name, max_batch in (("batched", 8), ("unbatched", 1)):
        with ServerProcess([*common, "--max-batch", str(max_batch), "--queue", str(4 * args.clients)]) as server:
            closed_loop(server, min(args.clients, max_batch), 1, args.steps, time.monotonic() + args.max_seconds)
            runs[name] = closed_loop(server, args.clients, args.requests, args.steps,
                                     time.monotonic() + args.max_seconds)
            runs[name]["max_batch"] = max_batch
        print(f"{name}: {runs[name]}", flush=True)
    with ServerProcess([*common, "--max-batch", "8", "--queue", "8"]) as server:
        runs["overload"] = overload(server, args.overload_clients, args.steps, timeout=args.max_seconds)
        runs["overload"]["queue"] = 8
    print(f"overload: {runs['overload']}", flush=True)
    speedup = None
    if runs["batched"]["images_per_s"] and runs["unbatched"]["images_per_s"]:
        speedup = round(runs["batched"]["images_per_s"] / runs["unbatched"]["images_per_s"], 3)
    result = {"benchmark": "serve", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": _machine(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "settings": {"model": args.model or "bundled tiny-sd (64x64)", "clients": args.clients,
                           "requests_per_client": args.requests, "steps": args.steps, "sampler": "Euler a"},
              "runs": runs, "batched_vs_unbatched_throughput": speedup, "goal": GOAL,
              "goal_met": speedup is not None and speedup >= GOAL}
    out = args.out or RESULTS / f"serve-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"throughput batched/unbatched: {speedup} (goal {GOAL}); overload ok: {runs['overload']['ok']}; wrote {out}")
    return 0 if runs["overload"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
