"""The fast part of the conformance run (``make test-conformance`` runs all of
it): CPython's own Pool/Queue/JoinableQueue/initializer tests on this Python
and its ProcessPoolExecutor tests on 3.13, under fork, stock and memshare side
by side. Every test that passes on the stock library must pass on memshare."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MATRIX = ROOT / "tests" / "conformance" / "matrix.py"
PYTHON_313 = ROOT / ".venv-3.13" / "bin" / "python"


def _matrix(python: Path | str, suite: str) -> None:
    out = subprocess.run(
        [sys.executable, str(MATRIX), "--python", str(python), "--suite", suite, "--start", "fork"],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "pass memshare" in out.stdout, out.stdout


@pytest.mark.timeout(1800)
def test_multiprocessing_suite_under_fork():
    _matrix(sys.executable, "mp")


@pytest.mark.timeout(1800)
def test_concurrent_futures_suite_under_fork_on_313():
    assert PYTHON_313.exists(), "memshare is not built for 3.13: run `make setup-conformance`"
    _matrix(PYTHON_313, "cf")
