import os
import sys
from pathlib import Path

# `python -m pytest` puts the working directory on sys.path. Run from the repository root, that makes the
# repo's kernels/ folder (installed as sdrt.kernels) importable as a top-level `kernels`, shadowing
# the PyPI package `kernels` that transformers imports with CLIP. sdrt itself is installed, so drop it.
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO_ROOT]

import pytest  # noqa: E402
import torch  # noqa: E402

# The Triton kernels run on CPU tensors only under Triton's interpreter, which `@triton.jit` picks when
# a kernel module is imported: set it before any test module can import one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# In CI (CI=true) a skipped test fails the run, unless it skipped for want of a CUDA GPU, which CI has not:
# everything else a test needs (packages, the vocabulary, the bundled model) CI has, so a skip there hides a defect.
IN_CI = os.environ.get("CI", "").lower() == "true"
CUDA_WORDS = ("CUDA", "GPU")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _fail_non_cuda_skip(report) -> None:
    if not (IN_CI and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if not any(word in reason for word in CUDA_WORDS):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where only tests that need CUDA may skip: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_non_cuda_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_non_cuda_skip(outcome.get_result())


pytest_plugins = ("pytester",)  # tests/test_ci_skip_policy.py runs this file on a small suite
