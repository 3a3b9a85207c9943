"""Test isolation for memshare: a private segment directory per session, a
leak check after every test, and a session check that nothing is left in it."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest


def _remove_dirs_of_killed_sessions() -> None:
    """A session killed from outside never reaches pytest_sessionfinish: its
    directory (named after its pid) stays. Remove those whose pytest is gone,
    after memshare's own check that no live process holds their arenas."""
    from memshare import _native as native

    for d in Path("/dev/shm").glob("memshare-pytest-*"):
        pid = d.name.rpartition("-")[2]
        if not pid.isdigit() or Path(f"/proc/{pid}").exists():
            continue  # a session that may still run (or a pid reused: leave it)
        try:
            native.collect_garbage(str(d))
        except OSError:
            continue
        if not any(p.name.startswith("memshare-") for p in d.iterdir()):
            shutil.rmtree(d, ignore_errors=True)


# Must happen before memshare creates its arena; children inherit it.
SHM_DIR = Path(f"/dev/shm/memshare-pytest-{os.getpid()}")
SHM_DIR.mkdir(mode=0o700, exist_ok=True)
os.environ["MEMSHARE_DIR"] = str(SHM_DIR)
os.environ.pop("MEMSHARE_ARENA", None)
os.environ.pop("MEMSHARE_LIMIT", None)

import memshare as ms  # noqa: E402
from memshare import _native  # noqa: E402

START_METHODS = ["fork", "spawn", "forkserver"]


def _dev_shm_entries() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(("memshare-", "sem."))}


_remove_dirs_of_killed_sessions()

# What was there before the session (other programs'); anything new that is
# still there at the end was left by the tests.
_DEV_SHM_BEFORE = _dev_shm_entries()


@pytest.fixture(params=START_METHODS)
def ctx(request):
    """A multiprocessing context for each start method."""
    return mp.get_context(request.param)


@pytest.fixture
def in_own_arena(request):
    """``run(name, *args)`` calls ``name(*args)`` of the test's module in a
    fresh interpreter that has an arena of its own: its free lists hold only
    what it freed, so what an allocation gets there does not depend on the
    tests before it. Fails with the interpreter's output if the call raises
    (or leaves anything in its arena: the function checks that itself)."""
    import subprocess

    module = request.module
    here = str(Path(module.__file__).parent)

    def run(name: str, *args) -> None:
        code = (
            f"import sys; sys.path.insert(0, {here!r}); "
            f"import {module.__name__} as m; m.{name}(*{args!r})"
        )
        env = {k: v for k, v in os.environ.items() if k != "MEMSHARE_ARENA"}
        # A session of its own: on a timeout, everything it started goes too
        # (SIGKILL ends a stopped process as well).
        p = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        try:
            out, _ = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate(timeout=60)
            pytest.fail(f"{name}{args} did not finish in 600 s:\n{out}")
        assert p.returncode == 0, f"{name}{args} failed:\n{out}"

    return run


def _settle() -> dict:
    gc.collect()
    s = ms.stats()
    if s["live_blocks"] or s["pins"]:
        ms.reap()
        gc.collect()
        s = ms.stats()
    return s


@pytest.fixture(autouse=True)
def no_leaks(request):
    """Every test must give back all shared memory it took."""
    before = _settle()
    yield
    # A Rust panic is a bug wherever it happens (also where it was caught).
    assert _native.panic_count() == 0, "a Rust panic happened in this process (see stderr)"
    if "allow_leftovers" in request.keywords:
        return
    after = _settle()
    assert (after["live_blocks"], after["bytes_in_use"], after["pins"]) == (
        before["live_blocks"],
        before["bytes_in_use"],
        before["pins"],
    ), f"shared memory left behind by the test: {after}"


def pytest_sessionfinish(session, exitstatus):
    gc.collect()
    _native.shutdown()
    leftovers = sorted(p.name for p in SHM_DIR.iterdir()) if SHM_DIR.exists() else []
    stray = sorted(_dev_shm_entries() - _DEV_SHM_BEFORE - {SHM_DIR.name})
    shutil.rmtree(SHM_DIR, ignore_errors=True)
    if leftovers:
        sys.stderr.write(f"\nmemshare: segments left in {SHM_DIR}: {leftovers}\n")
        session.exitstatus = 1
    if stray:
        sys.stderr.write(f"\nmemshare: the tests left these in /dev/shm: {stray}\n")
        session.exitstatus = 1
