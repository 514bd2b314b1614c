"""Running the installed `sdrt` entry point in a subprocess, and the checks every refusal must pass."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Optional



def _entry_point() -> list[str]:
    """The `sdrt` script installed beside this interpreter (a venv's own, not another one earlier on PATH),
    else the one on PATH, else `python -m sdrt.cli`."""
    beside = Path(sys.executable).with_name("sdrt")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("sdrt")
    return [found] if found else [sys.executable, "-m", "sdrt.cli"]


SDRT = _entry_point()


def sdrt(*args, cwd=None, env: Optional[Mapping[str, str]] = None) -> subprocess.CompletedProcess:
    """`sdrt *args`; `env` entries are added to this process's environment."""
    return subprocess.run([*SDRT, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env=None if env is None else {**os.environ, **env})


def assert_refused(run: subprocess.CompletedProcess, folder, *words: str) -> str:
    """Exit 2, one line on stderr holding every word, and no PNG or temporary file left in `folder`."""
    assert run.returncode == 2, (run.returncode, run.stderr)
    message = run.stderr.strip()
    assert len(message.splitlines()) == 1, message
    for word in words:
        assert word in message, message
    assert not list(folder.glob("*.png")) and not list(folder.glob(".*tmp"))
    return message
