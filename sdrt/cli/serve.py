"""`sdrt serve`: AUTOMATIC1111's and OpenAI's image APIs over HTTP, with dynamic batching.

Arguments are checked, then the model is loaded and warmed up, and only then does the server listen, so
`/health` answers (ready) only once it can serve. SIGTERM drains: queued requests get 503, the running
batch finishes, exit 0.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from sdrt.checks import check_positive_int
from sdrt.cli import serve_ray
from sdrt.cli.generate import _arg_type, _integer, _number
from sdrt.errors import BackendUnavailableError, InvalidInputError

HELP = "serve the model over HTTP (AUTOMATIC1111 and OpenAI image APIs) with dynamic batching"

log = logging.getLogger(__name__)


def _positive(name: str):
    return _arg_type(lambda t: check_positive_int(name, _integer(t)))


def _non_negative_number(name: str):
    def check(text: str) -> float:
        value = _number(text)
        if not value >= 0:
            raise InvalidInputError(f"{name} must be a number >= 0, got {text!r}")
        return value
    return _arg_type(check)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="diffusers folder or .safetensors checkpoint (default: the bundled tiny model)")
    p.add_argument("--backend", default="torch",
                   help="torch, triton, onnxruntime, tensorrt, openvino or auto (default torch)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: float16 on cuda)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_arg_type(lambda t: _port(t)), default=7860, help="default 7860")
    p.add_argument("--max-batch", type=_positive("--max-batch"), default=4,
                   help="images per batch, one pipeline call (default 4; 1 = no batching)")
    p.add_argument("--batch-wait-ms", type=_non_negative_number("--batch-wait-ms"), default=25.0,
                   help="how long a queued request waits for company (default 25)")
    p.add_argument("--queue", type=_positive("--queue"), default=64,
                   help="requests that may wait; more get 503 with Retry-After (default 64)")
    p.add_argument("--timeout", type=_non_negative_number("--timeout"), default=300.0, metavar="S",
                   help="seconds a request may take, queueing included, else 504 (default 300; 0 = none)")
    p.add_argument("--lora-dir", type=Path, default=None,
                   help="folder of LoRA .safetensors files that prompts may name as <lora:NAME:WEIGHT>")
    p.add_argument("--api-key-env", default=None, metavar="VAR",
                   help="environment variable holding the API key; then every endpoint but /health needs "
                        "'Authorization: Bearer <key>'")
    p.add_argument("--max-pixels", type=_positive("--max-pixels"), default=1024 * 1024,
                   help="largest width x height of an image (default 1048576)")
    p.add_argument("--max-steps", type=_positive("--max-steps"), default=150, help="default 150")
    p.add_argument("--max-images", type=_positive("--max-images"), default=16,
                   help="images per request (default 16)")
    p.add_argument("--max-body-mb", type=_non_negative_number("--max-body-mb"), default=32.0,
                   help="largest request body in MiB, base64 images included (default 32)")
    serve_ray.add_arguments(p)


def _port(text: str) -> int:
    port = _integer(text)
    if not 0 < port < 65536:
        raise InvalidInputError(f"--port must be in [1, 65535], got {text!r}")
    return port


def _api_key(var: str | None) -> str | None:
    if var is None:
        return None
    key = os.environ.get(var, "")
    if not key.strip():
        raise InvalidInputError(f"--api-key-env {var}: the environment variable {var} is unset or empty")
    return key.strip()


def _model_name(model: str | None) -> str:
    return "tiny-sd" if model is None else Path(model).name.removesuffix(".safetensors")


def run(args: argparse.Namespace) -> int:
    api_key = _api_key(args.api_key_env)
    if args.lora_dir is not None and not args.lora_dir.is_dir():
        raise InvalidInputError(f"--lora-dir {str(args.lora_dir)!r} is not a folder")
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise BackendUnavailableError(f"sdrt serve needs the serve extra ({e.name} is missing): "
                                      f"pip install 'sdrt[serve]'") from None
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without an API key (--api-key-env): anyone who can reach it can use it",
                    args.host)
    if args.ray:
        return serve_ray.run(args, api_key)
    serve_ray.refuse_ray_options(args)

    import sdrt
    from sdrt.serve.app import create_app
    from sdrt.serve.batcher import Batcher
    from sdrt.serve.loras import LoraLibrary, has_lora_api
    from sdrt.serve.metrics import ServeMetrics
    from sdrt.serve.server import DrainingServer
    from sdrt.serve.settings import Limits, ServedModel, ServeSettings
    from sdrt.serve.worker import PipelineWorker

    # The pipeline's own limits must admit whatever the server's limits admit (a batch of max-batch images).
    pipe_limits = sdrt.Limits(max_images=max(args.max_images, args.max_batch), max_steps=args.max_steps,
                              max_pixels=args.max_pixels)
    pipe = sdrt.load(args.model, backend=args.backend, device=args.device, dtype=args.dtype, limits=pipe_limits)
    train_steps = int(pipe.scheduler_config.get("num_train_timesteps", 1000))
    if args.max_steps > train_steps:  # a request over it would fail inside the worker, a 500 instead of a 422
        raise InvalidInputError(f"--max-steps {args.max_steps}: this model's schedulers take at most {train_steps} steps")
    loras = LoraLibrary(args.lora_dir, available=has_lora_api(pipe))
    if args.lora_dir is not None and not loras.available:
        log.warning("--lora-dir given, but this sdrt build has no LoRA support: requests naming a LoRA get 422")
    worker = PipelineWorker(pipe, loras)
    worker.warmup(steps=2, scheduler="ddim", num_images=1)

    model = ServedModel(name=_model_name(args.model), native_size=pipe.native_size,
                        inpainting=pipe.is_inpainting_model, size_multiple=max(8, pipe.vae_scale_factor), loras=loras)
    limits = Limits(max_pixels=args.max_pixels, max_steps=args.max_steps, max_images=args.max_images,
                    max_body_bytes=int(args.max_body_mb * 2**20))
    settings = ServeSettings(model=model, limits=limits, timeout_s=args.timeout or None, api_key=api_key)
    metrics = ServeMetrics(args.max_batch)
    batcher = Batcher(worker.run, max_batch=args.max_batch, batch_wait_s=args.batch_wait_ms / 1000,
                      max_queue=args.queue, metrics=metrics)
    app = create_app(batcher, settings, metrics)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning",
                            timeout_graceful_shutdown=None)
    print(f"sdrt serve: {model.name} on http://{args.host}:{args.port} (max batch {args.max_batch}, "
          f"queue {args.queue})", flush=True)
    try:
        DrainingServer(config, on_shutdown=batcher.begin_shutdown).run()
    finally:
        worker.close()
    return 0
