"""tests/conftest.py's CI rule, run on a small suite: under CI=true a skip fails the run unless it needs CUDA."""
from pathlib import Path

import pytest

SUITE = '''
import pytest
pytestmark = pytest.mark.filterwarnings("ignore")

def test_passes():
    pass

def test_skips_for_a_file():
    pytest.skip("the reference vocabulary is missing")

@pytest.mark.skipif(True, reason="needs a CUDA GPU")
def test_skips_for_cuda():
    pass

@pytest.mark.xfail(reason="known", strict=True)
def test_expected_failure():
    assert False
'''


@pytest.fixture
def suite(pytester):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text(encoding="utf-8"))
    pytester.makepyfile(test_suite=SUITE, test_missing_package="import pytest\npytest.importorskip('no_such_pkg_sdrt')\n")
    return pytester


def test_under_ci_only_cuda_skips_remain(suite, monkeypatch):
    monkeypatch.setenv("CI", "true")
    result = suite.runpytest("-rs", "--continue-on-collection-errors")
    result.assert_outcomes(passed=1, failed=1, skipped=1, xfailed=1, errors=1)
    for reason in ("the reference vocabulary is missing", "no_such_pkg_sdrt"):
        result.stdout.fnmatch_lines([f"*skipped under CI=true*{reason}*"])
    assert result.ret != 0


def test_outside_ci_skips_are_skips(suite, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    result = suite.runpytest()
    result.assert_outcomes(passed=1, skipped=3, xfailed=1)
    assert result.ret == 0
