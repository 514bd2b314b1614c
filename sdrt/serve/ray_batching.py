"""The generation service of one Ray Serve replica: Ray's `@serve.batch` in front of the replica's worker.

It is what `create_app` calls `service` (the same protocol as `sdrt serve`'s `Batcher`), so the replica
serves the same app. `@serve.batch` collects up to `max_batch` images (pieces of `split_job`, counted by
`batch_size_fn`) for at most `batch_wait_s`; the collected jobs are then split by `batch_key`, and each
group of jobs with one key is one pipeline call (`run_batch`), in arrival order of its first job. Jobs that
cannot share a forward pass (another size, sampler, LoRA set, img2img picture; inpainting) never do.
A failure answers the jobs of its group only. Imported only inside a replica: it imports ray.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Hashable, Optional, Sequence, Union

import PIL.Image
from ray import serve

from sdrt.serve.batcher import GenerationFailed, QueueFull, ShuttingDown
from sdrt.serve.jobs import GenerationJob, batch_key, split_job
from sdrt.serve.metrics import ServeMetrics
from sdrt.serve.worker import PipelineWorker

log = logging.getLogger(__name__)

Outcome = Union[list[PIL.Image.Image], GenerationFailed]


def group_by_batch_key(jobs: Sequence[GenerationJob]) -> list[list[int]]:
    """Indices of `jobs` in groups that can each run as one pipeline call, in order of first arrival;
    a job whose key is None is a group of its own."""
    groups: dict[Hashable, list[int]] = {}
    alone: list[list[int]] = []
    order: list[list[int]] = []
    for index, job in enumerate(jobs):
        key = batch_key(job)
        if key is None:
            alone.append([index])
            order.append(alone[-1])
        elif key in groups:
            groups[key].append(index)
        else:
            groups[key] = [index]
            order.append(groups[key])
    return order


def _images(jobs: list[GenerationJob]) -> int:
    return sum(job.num_images for job in jobs)


class RayBatchingService:
    """`await generate(job)` -> the job's images, batched by Ray Serve with compatible concurrent jobs."""

    def __init__(self, worker: PipelineWorker, *, max_batch: int, batch_wait_s: float, max_queue: int,
                 metrics: Optional[ServeMetrics] = None):
        self.worker, self.max_batch, self.max_queue, self.metrics = worker, max_batch, max_queue, metrics
        self.closing = False
        self._requests = 0          # requests of this replica not answered yet
        self._batch_seconds = 1.0   # running mean, for Retry-After
        self._idle = asyncio.Event()
        self._idle.set()
        self._run_collected.set_max_batch_size(max_batch)
        self._run_collected.set_batch_wait_timeout_s(batch_wait_s)

    @property
    def queue_depth(self) -> int:
        """Requests of this replica that are queued or running."""
        return self._requests

    def start(self) -> None:
        pass

    def begin_shutdown(self) -> None:
        """Take no new work; what was accepted is answered."""
        self.closing = True

    async def wait_closed(self) -> None:
        await self._idle.wait()
        self.worker.close()

    async def generate(self, job: GenerationJob) -> list[PIL.Image.Image]:
        if self.closing:
            raise ShuttingDown("the server is shutting down")
        if self._requests >= self.max_queue:
            waiting_batches = math.ceil(self._requests / self.max_batch) + 1
            raise QueueFull(max(1, math.ceil(waiting_batches * self._batch_seconds)))
        self._requests += 1
        self._idle.clear()
        try:
            outcomes = await asyncio.gather(*(self._run_collected(piece) for piece in split_job(job, self.max_batch)))
        finally:
            self._requests -= 1
            if self._requests == 0:
                self._idle.set()
        for outcome in outcomes:
            if isinstance(outcome, GenerationFailed):
                raise outcome
        return [image for images in outcomes for image in images]

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.025, batch_size_fn=_images)
    async def _run_collected(self, jobs: list[GenerationJob]) -> list[Outcome]:
        outcomes: list[Optional[Outcome]] = [None] * len(jobs)
        for group in group_by_batch_key(jobs):
            members = [jobs[i] for i in group]
            for index, result in zip(group, await self._run_group(members)):
                outcomes[index] = result
        return outcomes

    async def _run_group(self, jobs: list[GenerationJob]) -> list[Outcome]:
        images = _images(jobs)
        started = time.monotonic()
        if self.metrics is not None:
            self.metrics.batch_started(images)
        try:
            return await self.worker.run(jobs)
        except Exception as e:  # this group's requests get the failure; the replica keeps serving
            log.exception("a batch of %d jobs (%d images) failed", len(jobs), images)
            failure = GenerationFailed(f"{type(e).__name__}: {e}")
            failure.__cause__ = e
            return [failure] * len(jobs)
        finally:
            seconds = time.monotonic() - started
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
            if self.metrics is not None:
                self.metrics.observe_batch(images, seconds)
