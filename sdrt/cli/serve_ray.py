"""`sdrt serve --ray`: `sdrt serve`'s app on Ray Serve, one loaded pipeline per replica.

Without `--ray-address` a local Ray instance is started (and stopped at exit); `auto` joins the cluster
this machine belongs to (`ray start`), `ray://HOST:10001` connects through Ray Client. Ray's HTTP proxy
listens on --host/--port. SIGTERM or Ctrl+C: the application is deleted (replicas finish what they
hold), a local Ray is stopped, exit 0.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path

from sdrt.cli.generate import _arg_type, _integer
from sdrt.errors import BackendUnavailableError, InvalidInputError, ModelLoadError

log = logging.getLogger(__name__)

APP_NAME = "sdrt"


def _autoscale(text: str) -> tuple[int, int]:
    low, sep, high = text.partition(":")
    try:
        bounds = (int(low), int(high)) if sep else None
    except ValueError:
        bounds = None
    if bounds is None or not 0 <= bounds[0] <= bounds[1] or bounds[1] < 1:
        raise InvalidInputError(f"--autoscale must be MIN:MAX with 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return bounds


def _replicas(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise InvalidInputError(f"--replicas must be an integer >= 1, got {text!r}")
    return value


def _cpus(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise InvalidInputError(f"--replica-cpus must be a number > 0, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    ray = p.add_argument_group("Ray Serve (pip install 'sdrt[ray]')")
    ray.add_argument("--ray", action="store_true", help="serve on Ray Serve: the same API, one pipeline per replica")
    scale = ray.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=_arg_type(_replicas), default=None, help="replicas (default 1)")
    scale.add_argument("--autoscale", type=_arg_type(_autoscale), default=None, metavar="MIN:MAX",
                       help="scale between MIN and MAX replicas on ongoing requests")
    ray.add_argument("--ray-address", default=None, metavar="ADDRESS",
                     help="auto (this machine's cluster) or ray://HOST:PORT; default: start a local Ray")
    ray.add_argument("--replica-cpus", type=_arg_type(_cpus), default=1.0,
                     help="CPUs each replica asks Ray for (default 1; with GPUs each replica also asks for one)")


def refuse_ray_options(args: argparse.Namespace) -> None:
    """Ray's options without --ray are a mistake, not something to ignore."""
    given = [flag for flag, value in (("--replicas", args.replicas), ("--autoscale", args.autoscale),
                                      ("--ray-address", args.ray_address)) if value is not None]
    if given:
        raise InvalidInputError(f"{', '.join(given)} need --ray")


def run(args: argparse.Namespace, api_key: str | None) -> int:
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise BackendUnavailableError(f"sdrt serve --ray needs the ray extra ({e.name} is missing): "
                                      f"pip install 'sdrt[ray]'") from None
    from sdrt.cli.serve import _model_name
    from sdrt.serve.ray_deployment import ReplicaOptions, Scaling, application
    from sdrt.serve.settings import Limits

    local = args.ray_address is None
    if local and args.model is not None and not Path(args.model).exists():
        raise ModelLoadError(f"--model {args.model!r} does not exist")
    options = ReplicaOptions(
        model=None if args.model is None else str(Path(args.model).resolve()) if local else args.model,
        model_name=_model_name(args.model), backend=args.backend, device=args.device, dtype=args.dtype,
        max_batch=args.max_batch, batch_wait_s=args.batch_wait_ms / 1000, max_queue=args.queue,
        timeout_s=args.timeout or None, api_key=api_key,
        lora_dir=None if args.lora_dir is None else str(args.lora_dir.resolve()),
        limits=Limits(max_pixels=args.max_pixels, max_steps=args.max_steps, max_images=args.max_images,
                      max_body_bytes=int(args.max_body_mb * 2**20)))

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address=args.ray_address, include_dashboard=False if local else None,
             logging_level=logging.INFO if args.verbose else logging.WARNING)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        low, high = args.autoscale or (None, None)
        scaling = Scaling(replicas=args.replicas or 1, min_replicas=low, max_replicas=high,
                          gpus=ray.cluster_resources().get("GPU", 0) >= 1, cpus=args.replica_cpus)
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(application(options, scaling), name=APP_NAME, route_prefix="/")
        replicas = f"{low}..{high} replicas" if low is not None else f"{scaling.replicas} replica(s)"
        print(f"sdrt serve --ray: {options.model_name} on http://{args.host}:{args.port} ({replicas}, "
              f"{'1 GPU' if scaling.gpus else f'{scaling.cpus:g} CPU'} each, max batch {args.max_batch})", flush=True)
        stop.wait()
        log.info("stopping: deleting the application (replicas finish what they hold)")
    finally:
        if local:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        ray.shutdown()
    return 0
