"""uvicorn for `sdrt serve`: SIGTERM (or Ctrl+C) drains instead of dropping work, and the process exits 0.

On the first signal the queue is answered with 503 at once, the running batch finishes and is answered,
then uvicorn closes the connections and the app stops. A second Ctrl+C forces the exit.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType
from typing import Callable, Optional

import uvicorn

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], None]):
        super().__init__(config)
        self.on_shutdown = on_shutdown
        self.loop: Optional[asyncio.AbstractEventLoop] = None

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: Optional[FrameType]) -> None:
        # uvicorn re-raises a handled signal after its shutdown (the exit status would then say "killed");
        # a drain that went as planned is a success, so the signal is not recorded for that
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
            return
        if not self.should_exit:
            log.info("signal %d: draining (queued requests get 503, the running batch finishes)", sig)
            if self.loop is not None:
                self.loop.call_soon_threadsafe(self.on_shutdown)
        self.should_exit = True
