"""From the repository root, the repo's kernels/ folder (installed as sdrt.kernels) must not shadow
the PyPI package `kernels` that transformers imports with CLIP."""
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_transformers_clip_imports_under_pytest():
    import transformers

    assert transformers.CLIPTextModel.__name__ == "CLIPTextModel"


def test_python_m_sdrt_cli_in_repo_root_then_transformers_imports():
    # `python -c` puts the working directory first on sys.path, as `python -m sdrt.cli` does; running
    # the real __main__ must take it off before anything (`sdrt bench`) imports transformers.
    script = ("import runpy, sys\n"
              "sys.argv = ['sdrt', '--help']\n"
              "try:\n    runpy.run_module('sdrt.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
              "import transformers\ntransformers.CLIPTextModel\nprint('ok')\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]
