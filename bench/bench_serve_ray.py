"""`python -m sdrt.bench.bench_serve --ray`: throughput of `sdrt serve --ray` with 1 and 2 replicas, one run.

Each replica count gets its own `sdrt serve --ray` (a local Ray, 1 CPU per replica) and the same closed-loop
load as bench_serve. Writes bench/results/serve-ray-DATE.json. On a machine with fewer free cores than
replicas, the replicas share them and the second one adds little: the JSON records cores and load average.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import time

from sdrt.bench.bench_serve import RESULTS, _machine, closed_loop
from sdrt.bench.serve_process import ServerProcess


def main(args: argparse.Namespace, common: list[str]) -> int:
    runs, load_before = {}, os.getloadavg()
    for replicas in (1, 2):
        with ServerProcess(["--ray", "--replicas", str(replicas), *common, "--max-batch", "8",
                            "--queue", str(4 * args.clients)], ready_timeout=300) as server:
            closed_loop(server, args.clients, 1, args.steps, time.monotonic() + args.max_seconds)  # warm both
            runs[f"replicas_{replicas}"] = closed_loop(server, args.clients, args.requests, args.steps,
                                                       time.monotonic() + args.max_seconds)
        print(f"{replicas} replica(s): {runs[f'replicas_{replicas}']}", flush=True)
    one, two = runs["replicas_1"]["images_per_s"], runs["replicas_2"]["images_per_s"]
    scaling = round(two / one, 3) if one and two else None
    result = {"benchmark": "serve-ray", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": _machine(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "settings": {"model": args.model or "bundled tiny-sd (64x64)", "clients": args.clients,
                           "requests_per_client": args.requests, "steps": args.steps, "cpus_per_replica": 1,
                           "max_batch": 8},
              "runs": runs, "two_vs_one_replica_throughput": scaling}
    out = args.out or RESULTS / f"serve-ray-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"throughput 2 replicas / 1 replica: {scaling}; wrote {out}")
    return 0
