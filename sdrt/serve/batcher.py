"""The bounded queue in front of the worker: groups queued jobs that share a batch key into batches.

The oldest queued job always goes next; jobs behind it with the same `batch_key` join it, up to
`max_batch` images, and it waits at most `batch_wait_s` after it was queued for such company (never when
it already waited that long for the worker). A cancelled job (its client disconnected or timed out) is
dropped before its turn. Batches run one at a time; the event loop only awaits them.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Hashable, Optional, Sequence

import PIL.Image

from sdrt.serve.jobs import GenerationJob, batch_key, split_job
from sdrt.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)

RunBatch = Callable[[Sequence[GenerationJob]], Awaitable[list[list[PIL.Image.Image]]]]


class QueueFull(Exception):
    """The queue holds its maximum of requests; try again after `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server is draining: it takes no new work and answers what was queued with this."""


class GenerationFailed(Exception):
    """The batch a job ran in failed (the cause is chained)."""


@dataclass
class _Request:
    queued_items: int  # its pieces still waiting in the queue


@dataclass(eq=False)  # identity: a queue holds each item once
class _Item:
    job: GenerationJob
    key: Optional[Hashable]
    request: _Request
    future: asyncio.Future
    queued_at: float = field(default_factory=time.monotonic)


class Batcher:
    """`await generate(job)` -> the job's images, batched with compatible queued jobs."""

    def __init__(self, run: RunBatch, *, max_batch: int, batch_wait_s: float, max_queue: int,
                 metrics: Optional[ServeMetrics] = None):
        self.run, self.max_batch, self.batch_wait_s, self.max_queue = run, max_batch, batch_wait_s, max_queue
        self.metrics = metrics
        self.closing = False
        self._queue: deque[_Item] = deque()
        self._queued_requests = 0
        self._arrived: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self._batch_seconds = 1.0  # running mean, for Retry-After

    @property
    def queue_depth(self) -> int:
        """Requests waiting for their turn (the running batch not counted)."""
        return self._queued_requests

    def start(self) -> None:
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._serve(), name="sdrt-batcher")

    def begin_shutdown(self) -> None:
        """Take no new work, answer every queued job with ShuttingDown; the running batch finishes."""
        self.closing = True
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(ShuttingDown("the server is shutting down"))
        self._queue.clear()
        self._queued_requests = 0
        if self._arrived is not None:
            self._arrived.set()

    async def wait_closed(self) -> None:
        if self._task is not None:
            await self._task

    async def generate(self, job: GenerationJob) -> list[PIL.Image.Image]:
        if self.closing:
            raise ShuttingDown("the server is shutting down")
        if self._queued_requests >= self.max_queue:
            raise QueueFull(self._retry_after())
        pieces = split_job(job, self.max_batch)
        request = _Request(queued_items=len(pieces))
        loop = asyncio.get_running_loop()
        items = [_Item(piece, batch_key(piece), request, loop.create_future()) for piece in pieces]
        self._queue.extend(items)
        self._queued_requests += 1
        self._arrived.set()
        futures = [item.future for item in items]
        try:
            results = await asyncio.gather(*futures)
        except BaseException:  # a piece failed, or this call was cancelled (timeout, disconnect)
            for item in items:
                if not item.future.done():
                    item.future.cancel()
                elif not item.future.cancelled():
                    item.future.exception()  # retrieved: one failure is reported once
                if item in self._queue:  # dropped before its turn
                    self._queue.remove(item)
                    self._leave_queue(item)
            self._arrived.set()
            raise
        return [image for images in results for image in images]

    def _retry_after(self) -> int:
        waiting_batches = math.ceil(sum(i.job.num_images for i in self._queue) / self.max_batch) + 1
        return max(1, math.ceil(waiting_batches * self._batch_seconds))

    def _leave_queue(self, item: _Item) -> None:
        item.request.queued_items -= 1
        if item.request.queued_items == 0:
            self._queued_requests -= 1

    def _drop_cancelled_head(self) -> None:
        while self._queue and self._queue[0].future.done():
            self._leave_queue(self._queue.popleft())

    def _company(self, head: _Item) -> list[_Item]:
        """The head and the queued jobs that can join it, in queue order, up to max_batch images."""
        batch, images = [head], head.job.num_images
        if head.key is None:
            return batch
        for item in self._queue:
            if item is head or item.future.done() or item.key != head.key:
                continue
            if images + item.job.num_images <= self.max_batch:
                batch.append(item)
                images += item.job.num_images
        return batch

    async def _wait_for_company(self, head: _Item) -> None:
        deadline = head.queued_at + self.batch_wait_s
        while not self.closing and not head.future.done() and head.key is not None:
            if sum(i.job.num_images for i in self._company(head)) >= self.max_batch:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    async def _serve(self) -> None:
        while True:
            self._drop_cancelled_head()
            if not self._queue:
                if self.closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            head = self._queue[0]
            await self._wait_for_company(head)
            self._drop_cancelled_head()
            if not self._queue or self._queue[0] is not head:
                continue  # the head left (cancelled, or the queue was answered by a shutdown)
            batch = self._company(head)
            for item in batch:
                self._queue.remove(item)
                self._leave_queue(item)
            await self._run(batch)

    async def _run(self, batch: list[_Item]) -> None:
        images = sum(item.job.num_images for item in batch)
        started = time.monotonic()
        if self.metrics is not None:
            self.metrics.batch_started(images)
        try:
            results = await self.run([item.job for item in batch])
        except Exception as e:  # the batch's requests get the failure; the server keeps serving
            log.exception("a batch of %d jobs (%d images) failed", len(batch), images)
            failure = GenerationFailed(f"{type(e).__name__}: {e}")
            failure.__cause__ = e
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(failure)
            return
        finally:
            seconds = time.monotonic() - started
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
            if self.metrics is not None:
                self.metrics.observe_batch(images, seconds)
        for item, result in zip(batch, results):
            if not item.future.done():
                item.future.set_result(result)
