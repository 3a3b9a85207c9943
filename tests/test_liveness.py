"""Liveness under hostile conditions (issue 11): forks while other threads
use memshare, programs starting at the same instant, more processes than
slots, a stopped peer holding the arena mutex, children forked without
Python's fork hooks. Each scenario runs in real separate programs, and every
wait is bounded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

# Every program of these tests reports Rust panics it saw (none may happen).
_PRELUDE = """
import json, os, sys
import memshare as ms
from memshare import _native
"""


def run_program(source: str, *args: str, timeout: float = 240, env: dict | None = None):
    """Runs `source` as a separate Python program; returns its CompletedProcess."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    program = _PRELUDE + textwrap.dedent(source)
    return subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", program, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


FORK_STRESS = """
import pickle, select, signal, threading
import numpy as np

forks = int(sys.argv[1])
stop = threading.Event()
q = ms.Queue()
shared = ms.share(np.arange(1000.0))

def sharer():
    while not stop.is_set():
        a = ms.share(np.ones(2000))
        del a

def pickler():
    while not stop.is_set():
        pickle.loads(pickle.dumps(shared))

def getter():
    import queue
    while not stop.is_set():
        try:
            q.get(timeout=0.001)
        except queue.Empty:
            pass

threads = [threading.Thread(target=f, daemon=True) for f in (sharer, pickler, getter)]
for t in threads:
    t.start()
hangs = failures = 0
for _ in range(forks):
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            b = ms.share(np.arange(10.0))
            code = 0 if b.sum() == 45.0 else 1
            del b
            _native.shutdown()
        finally:
            os._exit(code)
    fd = os.pidfd_open(pid)
    try:
        # Generous: a loaded machine may take seconds to run one child.
        ready, _, _ = select.select([fd], [], [], 60)
        if not ready:
            hangs += 1
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        if ready and os.waitstatus_to_exitcode(status) != 0:
            failures += 1
    finally:
        os.close(fd)
stop.set()
for t in threads:
    t.join(60)
del shared, q
result = {"forks": forks, "hangs": hangs, "failures": failures}
print(json.dumps({**result, "panics": _native.panic_count()}))
"""


def _fork_stress(forks: int) -> None:
    p = run_program(FORK_STRESS, str(forks), timeout=1800)
    assert p.returncode == 0, p.stderr
    r = last_json(p.stdout)
    assert r == {"forks": forks, "hangs": 0, "failures": 0, "panics": 0}, (r, p.stderr[-2000:])
    assert "panicked" not in p.stderr, p.stderr


def test_fork_while_other_threads_use_memshare():
    """Forked children never hang on a lock another thread held at fork."""
    _fork_stress(200)


@pytest.mark.slow
def test_fork_while_other_threads_use_memshare_2000_times():
    _fork_stress(2000)


HOOKLESS_FORK = """
import ctypes, select
import numpy as np

a = ms.share(np.arange(100.0))
token = _native.arena_token()
libc = ctypes.CDLL(None, use_errno=True)
pid = libc.fork()  # no Python fork hooks run
if pid == 0:
    # The child uses memshare and leaves through the normal exit path
    # (atexit detaches): it must not take its parent's arena with it.
    code = 1
    try:
        b = ms.share(np.ones(10))
        code = 0 if b.sum() == 10.0 and float(a.sum()) == 4950.0 else 1
        del b
    finally:
        sys.stdout.flush()
        sys.exit(code)
fd = os.pidfd_open(pid)
ready, _, _ = select.select([fd], [], [], 120)
if not ready:
    os.kill(pid, 9)
_, status = os.waitpid(pid, 0)
ctl = os.path.join(os.environ["MEMSHARE_DIR"], "memshare-" + token)
c = ms.share(np.ones(5))
print(json.dumps({
    "child": os.waitstatus_to_exitcode(status),
    "arena_kept": os.path.exists(ctl),
    "sum": float(a.sum()),
    "new": float(c.sum()),
    "processes": ms.stats()["processes"],
    "same_arena": _native.arena_token() == token,
    "panics": _native.panic_count(),
}))
"""


def test_child_forked_without_hooks_leaves_the_parents_arena_alone():
    p = run_program(HOOKLESS_FORK)
    assert p.returncode == 0, p.stderr
    r = last_json(p.stdout)
    assert r == {
        "child": 0,
        "arena_kept": True,
        "sum": 4950.0,
        "new": 5.0,
        "processes": 1,
        "same_arena": True,
        "panics": 0,
    }, (r, p.stderr[-2000:])
