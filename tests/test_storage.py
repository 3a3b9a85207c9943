"""Storage of the arena: limits, segment names and ownership, memory given
back to the OS, fragmentation, and memory-backed segments when the shm
directory is too small."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

TIMEOUT = 120


def run_python(code: str, env_extra: dict[str, str], timeout: float = TIMEOUT):
    env = {k: v for k, v in os.environ.items() if k not in ("MEMSHARE_ARENA", "MEMSHARE_LIMIT")}
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout
    )


# --- MEMSHARE_LIMIT ------------------------------------------------------------

LIMIT_PROBE = (
    "import numpy as np, memshare as ms\n"
    "try:\n"
    "    ms.share(np.ones(1000))\n"
    "    print('limit', ms.stats()['limit'])\n"
    "except ValueError as e:\n"
    "    print('ValueError', e)\n"
)


@pytest.mark.parametrize("value", ["lots", "-1", "1e30", "1.5x", "1.5", "8 G B", ""])
def test_bad_limit_is_a_value_error_naming_the_variable_and_forms(value):
    out = run_python(LIMIT_PROBE, {"MEMSHARE_LIMIT": value})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ValueError"), out.stdout
    assert "MEMSHARE_LIMIT" in out.stdout and "8G" in out.stdout and "512M" in out.stdout
    assert "bytes" in out.stdout


@pytest.mark.parametrize(
    ("value", "limit"),
    [("0", "None"), ("512M", str(512 << 20)), ("1.5G", str(3 << 29)), ("1048576", "1048576")],
)
def test_good_limits_are_taken_and_zero_means_none(value, limit):
    out = run_python(LIMIT_PROBE, {"MEMSHARE_LIMIT": value})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"limit {limit}", out.stdout
