"""`sdrt serve --ray`: the same FastAPI app as `sdrt serve`, as a Ray Serve deployment.

Each replica loads and warms one pipeline in its constructor, then builds the app (`create_app`) over a
`RayBatchingService` (Ray's `@serve.batch`, grouped by `batch_key`) and hands it to Ray with
`@serve.ingress` (late-bound: `__serve_build_asgi_app__`). Ray's proxy spreads requests over replicas;
each answer names its replica in the `x-sdrt-replica` header (and its process in `x-sdrt-replica-pid`).

`application(options, scaling)` is what `serve.run` takes; `build_app(args)` is the same for a
Ray Serve config file (KubeRay `RayService`). Imported only when Ray is wanted: it imports ray.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ray import serve

from sdrt.errors import InvalidInputError
from sdrt.serve.settings import Limits

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-sdrt-replica"
REPLICA_PID_HEADER = "x-sdrt-replica-pid"


@dataclass(frozen=True)
class ReplicaOptions:
    """What each replica loads and serves (the arguments of `sdrt serve`, minus host and port)."""
    model: Optional[str] = None          # a path on every node (or shared storage); None: the bundled model
    model_name: str = "tiny-sd"
    backend: str = "torch"
    device: Optional[str] = None
    dtype: Optional[str] = None
    max_batch: int = 4
    batch_wait_s: float = 0.025
    max_queue: int = 64
    timeout_s: Optional[float] = 300.0
    lora_dir: Optional[str] = None
    api_key: Optional[str] = None
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class Scaling:
    """Fixed `replicas`, or autoscaling between `min_replicas` and `max_replicas` on ongoing requests."""
    replicas: int = 1
    min_replicas: Optional[int] = None
    max_replicas: Optional[int] = None
    gpus: bool = False                   # one GPU per replica (else `cpus` CPUs)
    cpus: float = 1.0

    def deployment_options(self, options: ReplicaOptions) -> dict[str, Any]:
        actor = {"num_gpus": 1, "num_cpus": self.cpus} if self.gpus else {"num_cpus": self.cpus}
        scale: dict[str, Any] = {"num_replicas": self.replicas}
        if self.min_replicas is not None:
            # a replica is busy when it holds a full batch; more waiting than that calls for another one
            scale = {"autoscaling_config": {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                            "target_ongoing_requests": options.max_batch}}
        return {"ray_actor_options": actor, "max_ongoing_requests": options.max_queue + options.max_batch,
                "health_check_period_s": 2, **scale}


@serve.ingress()
class SdrtReplica:
    """One replica: a loaded, warmed pipeline and the app that serves it."""

    def __init__(self, options: ReplicaOptions):
        import sdrt
        from sdrt.serve.loras import LoraLibrary, has_lora_api
        from sdrt.serve.metrics import ServeMetrics
        from sdrt.serve.ray_batching import RayBatchingService
        from sdrt.serve.settings import ServedModel, ServeSettings
        from sdrt.serve.worker import PipelineWorker

        limits = options.limits
        pipe_limits = sdrt.Limits(max_images=max(limits.max_images, options.max_batch), max_steps=limits.max_steps,
                                  max_pixels=limits.max_pixels)
        pipe = sdrt.load(options.model, backend=options.backend, device=options.device, dtype=options.dtype,
                         limits=pipe_limits)
        lora_dir = None if options.lora_dir is None else Path(options.lora_dir)
        loras = LoraLibrary(lora_dir, available=has_lora_api(pipe))
        self.worker = PipelineWorker(pipe, loras)
        self.worker.warmup(steps=2, scheduler="ddim", num_images=1)
        model = ServedModel(name=options.model_name, native_size=pipe.native_size,
                            inpainting=pipe.is_inpainting_model, size_multiple=max(8, pipe.vae_scale_factor),
                            loras=loras)
        self.settings = ServeSettings(model=model, limits=limits, timeout_s=options.timeout_s,
                                      api_key=options.api_key)
        self.metrics = ServeMetrics(options.max_batch)
        self.service = RayBatchingService(self.worker, max_batch=options.max_batch,
                                          batch_wait_s=options.batch_wait_s, max_queue=options.max_queue,
                                          metrics=self.metrics)
        self.replica = serve.get_replica_context().replica_id.to_full_id_str()
        log.info("replica %s ready (pid %d)", self.replica, os.getpid())

    def __serve_build_asgi_app__(self):
        from sdrt.serve.app import create_app

        app = create_app(self.service, self.settings, self.metrics)
        app.add_middleware(_ReplicaHeaders, headers=[(REPLICA_HEADER.encode(), self.replica.encode()),
                                                     (REPLICA_PID_HEADER.encode(), str(os.getpid()).encode())])
        return app


class _ReplicaHeaders:
    """ASGI middleware: adds `headers` to every HTTP response (leaves the body and receive() alone)."""

    def __init__(self, app, headers: list[tuple[bytes, bytes]]):
        self.app, self.headers = app, headers

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def application(options: ReplicaOptions, scaling: Scaling):
    """The bound deployment `serve.run` deploys."""
    return serve.deployment(SdrtReplica, name="sdrt", **scaling.deployment_options(options)).bind(options)


def build_app(args: dict[str, Any]):
    """Application builder for Ray Serve config files (`import_path: sdrt.serve.ray_deployment:build_app`).

    `args`: the `ReplicaOptions` fields (limits as a mapping of `Limits` fields) and the `Scaling` fields,
    e.g. {"model": "/models/sd15", "model_name": "sd15", "replicas": 2, "gpus": true}."""
    args = dict(args)
    scaling_fields = {k: args.pop(k) for k in list(args) if k in Scaling.__dataclass_fields__}
    unknown = sorted(set(args) - set(ReplicaOptions.__dataclass_fields__))
    if unknown:
        raise InvalidInputError(f"build_app: unknown arguments {unknown}; allowed: "
                                f"{sorted([*ReplicaOptions.__dataclass_fields__, *Scaling.__dataclass_fields__])}")
    limits = Limits(**args.pop("limits", {}))
    return application(ReplicaOptions(**args, limits=limits), Scaling(**scaling_fields))
