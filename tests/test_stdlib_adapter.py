"""The pools' adapter for CPython's private multiprocessing names holds on
every supported CPython version (it imports only the stdlib, so it runs
without memshare installed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from memshare._pool import _stdlib

ADAPTER = Path(_stdlib.__file__)
PYENV_ROOT = Path.home() / ".pyenv" / "versions"
VERSIONS = ["3.10", "3.11", "3.12", "3.13"]


def _interpreter(version: str) -> Path:
    found = sorted(PYENV_ROOT.glob(f"{version}.*/bin/python{version}"))
    assert found, f"no CPython {version} under {PYENV_ROOT} (pyenv install {version})"
    return found[-1]


def test_adapter_self_check_here():
    _stdlib.self_check()


@pytest.mark.parametrize("version", VERSIONS)
def test_adapter_self_check_on_cpython(version):
    out = subprocess.run(
        [str(_interpreter(version)), "-I", str(ADAPTER)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "memshare stdlib adapter: ok"


PRIVATE_NAMES = [
    "._taskqueue",
    "._cache",
    "._outqueue",
    "._inqueue",
    "._worker_handler",
    "._quick_get",
    "._get_tasks",
    "_helper_reraises_exception",
    "._event",
    "._items",
    "._number_left",
    "._cond",
    "._job",
    "._pool =",
    "._pool)",
    "concurrent.futures.process._",
]


def test_only_the_adapter_touches_private_stdlib_names():
    package = ADAPTER.parent
    offenders = []
    for path in sorted(package.glob("*.py")):
        if path == ADAPTER:
            continue
        text = path.read_text()
        offenders += [f"{path.name}: {name}" for name in PRIVATE_NAMES if name in text]
    assert offenders == []
