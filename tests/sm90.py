"""Compile the Triton kernels for the H100 (sm_90) in a fresh process, no GPU needed."""
from __future__ import annotations

import json
import os
import subprocess
import sys


def compile_for_sm90(kernel_name: str) -> list:
    """Run sdrt.kernels.compile_check without the interpreter; its JSON lines."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "sdrt.kernels.compile_check", kernel_name],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]
