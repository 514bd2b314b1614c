"""A real `sdrt serve` process on a free loopback port, for the serve benchmark and tests."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m sdrt.cli serve ARGS` on a free port; `with` starts it, waits for /health and stops it."""

    def __init__(self, args: Sequence[str] = (), env: Optional[dict[str, str]] = None, ready_timeout: float = 300):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.args, self.ready_timeout = list(args), ready_timeout
        self.env = {**os.environ, **(env or {})}
        self.log = Path(tempfile.mkstemp(prefix="sdrt-serve-", suffix=".log")[1])
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> "ServerProcess":
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "sdrt.cli", "serve", "--host", HOST,
                                             "--port", str(self.port), *self.args],
                                            stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sdrt serve exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.health() == "ready":
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"sdrt serve was not ready within {self.ready_timeout} s:\n{self.log_tail()}")

    def health(self) -> Optional[str]:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                return json.load(response)["status"]
        except urllib.error.HTTPError as e:
            try:
                return json.load(e)["status"]
            except ValueError:  # not the app's answer (Ray's proxy before the app is deployed)
                return None
        except OSError:
            return None

    def terminate(self) -> None:
        """SIGTERM: the server drains and exits."""
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 120) -> int:
        return self.process.wait(timeout)

    def stop(self) -> Optional[int]:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.terminate()
        try:
            return self.wait()
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.log.unlink(missing_ok=True)
