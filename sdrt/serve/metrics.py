"""Prometheus metrics of one server, in a registry of its own (several apps can live in one process)."""
from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ERROR_KINDS = ("invalid", "too_large", "unauthorized", "queue_full", "shutting_down", "timeout", "disconnected",
               "internal")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()
        self.queue_depth = Gauge("sdrt_queue_depth", "requests waiting for their turn", registry=self.registry)
        self.running = Gauge("sdrt_batch_running_images", "images of the batch running now (0: idle)",
                             registry=self.registry)
        self.batch_size = Histogram("sdrt_batch_size_images", "images per batch (one pipeline call)",
                                    buckets=tuple(range(1, max_batch + 1)), registry=self.registry)
        self.batch_seconds = Histogram("sdrt_batch_seconds", "seconds per batch", buckets=LATENCY_BUCKETS,
                                       registry=self.registry)
        self.latency = Histogram("sdrt_request_latency_seconds", "seconds from request to response, by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.images = Counter("sdrt_images", "images generated and returned", registry=self.registry)
        self.errors = Counter("sdrt_errors", "requests answered with an error (or dropped), by kind", ["kind"],
                              registry=self.registry)
        for kind in ERROR_KINDS:
            self.errors.labels(kind)

    def track_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(lambda: float(depth()))

    def batch_started(self, images: int) -> None:
        self.running.set(images)

    def observe_batch(self, images: int, seconds: float) -> None:
        self.running.set(0)
        self.batch_size.observe(images)
        self.batch_seconds.observe(seconds)

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
