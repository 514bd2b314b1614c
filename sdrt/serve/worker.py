"""The pipeline and the one thread that runs it: all model work happens there, off the event loop."""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

import PIL.Image

from sdrt.serve.jobs import GenerationJob
from sdrt.serve.loras import LoraLibrary
from sdrt.serve.runner import batch_invariant_kernels, run_batch

log = logging.getLogger(__name__)


class PipelineWorker:
    """Runs batches on `pipe` one at a time, on a thread of its own."""

    def __init__(self, pipe: Any, loras: Optional[LoraLibrary] = None):
        self.pipe, self.loras = pipe, loras
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdrt-pipeline")

    def warmup(self, steps: int, scheduler: str, num_images: int) -> dict[str, float]:
        """One throwaway generation at the model's native size (blocking; call before serving)."""
        def run() -> dict[str, float]:
            with batch_invariant_kernels(self.pipe.device):
                return self.pipe.warmup(num_images=num_images, steps=steps, scheduler=scheduler)
        timings = self._thread.submit(run).result()
        log.info("warmed up in %.2f s", timings.get("total", 0.0))
        return timings

    async def run(self, jobs: Sequence[GenerationJob]) -> list[list[PIL.Image.Image]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, run_batch, self.pipe, list(jobs), self.loras)

    def close(self) -> None:
        """Wait for the running batch, then stop the thread."""
        self._thread.shutdown(wait=True)
