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
    """Runs `source` as a separate Python program (an arena of its own unless
    `env` names one); returns its CompletedProcess."""
    full_env = {k: v for k, v in os.environ.items() if k != "MEMSHARE_ARENA"}  # its own arena
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


START_AT_ONCE = """
import pickle
import numpy as np

sys.stdin.read(1)  # every program starts here at the same instant
a = ms.share(np.arange(1000.0))
b = pickle.loads(pickle.dumps(a))
ok = float(b.sum()) == 499500.0 and ms.stats()["processes"] >= 1
del a, b
print(json.dumps({"ok": ok, "panics": _native.panic_count()}))
"""


def test_programs_starting_at_the_same_instant_never_remove_each_others_arena():
    """30 independent programs x 3 rounds, one MEMSHARE_DIR, no MEMSHARE_ARENA."""
    from conftest import SHM_DIR

    shared_dir = SHM_DIR / f"starts-{os.getpid()}"
    shared_dir.mkdir(mode=0o700)
    env = dict(os.environ, MEMSHARE_DIR=str(shared_dir))
    env.pop("MEMSHARE_ARENA", None)
    program = _PRELUDE + textwrap.dedent(START_AT_ONCE)
    failures = []
    try:
        for _round in range(3):
            procs = [
                subprocess.Popen(
                    [sys.executable, "-c", program],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=env,
                )
                for _ in range(30)
            ]
            try:
                for p in procs:
                    p.stdin.write("go")
                for p in procs:
                    p.stdin.close()
                    p.stdin = None  # communicate() must not flush it
                for p in procs:
                    out, err = p.communicate(timeout=240)
                    lines = out.strip().splitlines()
                    result = json.loads(lines[-1]) if lines else None
                    if p.returncode != 0 or result != {"ok": True, "panics": 0}:
                        failures.append((p.returncode, result, err[-1500:]))
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                        p.communicate(timeout=60)
        assert failures == []
        assert sorted(os.listdir(shared_dir)) == []
    finally:
        for name in os.listdir(shared_dir):
            os.unlink(shared_dir / name)
        shared_dir.rmdir()


PEER = """
import numpy as np

a = ms.share(np.ones(10))
print(_native.arena_token(), flush=True)
sys.stdin.readline()  # the victim has joined the arena
_native._debug_hold_arena_lock()
print("locked", flush=True)
sys.stdin.read(1)  # the test stops this process here, then resumes it
_native._debug_release_arena_lock()
del a
"""

VICTIM = """
import queue, threading, time
import numpy as np

q = ms.Queue()  # made before the peer took the lock
arr = ms.share(np.ones(1000))
print("ready", flush=True)
sys.stdin.readline()  # the peer now holds the lock and is stopped
t0 = time.monotonic()
try:
    q.get(timeout=0.5)
    get = "returned"
except queue.Empty:
    get = "empty"
get_s = time.monotonic() - t0
t0 = time.monotonic()
try:
    q.put(np.ones(300_000), timeout=0.5)
    put = "returned"
except queue.Full:
    put = "full"
put_s = time.monotonic() - t0
# Calls without a timeout wait for the peer, but never with the GIL held:
# this thread goes on running while they wait (one of them drops the array).
box = [arr]
del arr
waiters = [threading.Thread(target=ms.stats), threading.Thread(target=box.clear)]
for w in waiters:
    w.start()
for w in waiters:
    w.join(1.0)
blocked = [w.is_alive() for w in waiters]
print(json.dumps({"get": get, "put": put, "get_s": get_s, "put_s": put_s, "blocked": blocked}),
      flush=True)
sys.stdin.readline()  # the peer has been resumed
for w in waiters:
    w.join(120)
del q
print(json.dumps({"done": [not w.is_alive() for w in waiters], "panics": _native.panic_count()}))
"""


def _spawn(source: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _PRELUDE + textwrap.dedent(source)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_a_stopped_peer_holding_the_arena_lock_blocks_nobody_with_the_gil():
    import signal

    from conftest import SHM_DIR

    shared_dir = SHM_DIR / f"stopped-{os.getpid()}"
    shared_dir.mkdir(mode=0o700)
    env = dict(os.environ, MEMSHARE_DIR=str(shared_dir))
    env.pop("MEMSHARE_ARENA", None)
    peer = _spawn(PEER, env)
    victim = None
    try:
        token = peer.stdout.readline().strip()
        victim = _spawn(VICTIM, dict(env, MEMSHARE_ARENA=token))
        assert victim.stdout.readline().strip() == "ready", victim.stderr.read()
        peer.stdin.write("lock\n")
        peer.stdin.flush()
        assert peer.stdout.readline().strip() == "locked", peer.stderr.read()
        os.kill(peer.pid, signal.SIGSTOP)
        victim.stdin.write("go\n")
        victim.stdin.flush()
        phase1 = json.loads(victim.stdout.readline())
        print("stopped peer:", phase1)  # the figures (seen with pytest -s)
        assert phase1["get"] == "empty" and phase1["put"] == "full", phase1
        assert phase1["blocked"] == [True, True], phase1
        # Another program of the user (its own arena) and `memshare ls` finish.
        other = run_program(
            "import numpy as np\nprint(float(ms.share(np.ones(3)).sum()))", env=env, timeout=120
        )
        assert other.returncode == 0 and other.stdout.strip() == "3.0", other.stderr
        ls = subprocess.run(
            [sys.executable, "-m", "memshare", "ls", "--dir", str(shared_dir)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert "busy" in ls.stdout, (ls.stdout, ls.stderr)
    finally:
        os.kill(peer.pid, signal.SIGCONT)
    try:
        peer.stdin.write("x")
        peer.stdin.flush()
        _, peer_err = peer.communicate(timeout=120)
        assert peer.returncode == 0, peer_err
        if victim is not None:
            victim.stdin.write("resumed\n")
            victim.stdin.flush()
            out, err = victim.communicate(timeout=120)
            assert victim.returncode == 0, err
            assert json.loads(out.strip().splitlines()[-1]) == {"done": [True, True], "panics": 0}
    finally:
        for p in (peer, victim):
            if p is not None:
                if p.poll() is None:
                    p.kill()
                p.communicate(timeout=60)  # reaps it and closes its pipes
        for name in os.listdir(shared_dir):
            os.unlink(shared_dir / name)
        shared_dir.rmdir()


MORE_THAN_SLOTS = """
import select
import numpy as np

a = ms.share(np.ones(4))
limit = ms.stats()["max_processes"]
try:
    ms.Pool(limit + 44)
    pool_error = ""
except ms.SharedMemoryError as e:
    pool_error = str(e)
r, w = os.pipe()
children = []
for _ in range(limit + 4):  # more children than the arena has slots
    pid = os.fork()
    if pid == 0:
        os.close(w)
        code = 1
        try:
            b = ms.share(np.ones(4))  # past the limit: in an arena of its own
            code = 0 if b.sum() == 4.0 else 1
            del b
            os.read(r, 1)  # keep the slot until every child is forked
            _native.shutdown()
            code = code if _native.panic_count() == 0 else 5
        except ms.SharedMemoryError:
            code = 3
        finally:
            os._exit(code)
    children.append(pid)
os.close(r)
os.close(w)  # end of file: the children go
codes = []
for pid in children:
    fd = os.pidfd_open(pid)
    if not select.select([fd], [], [], 120)[0]:
        os.kill(pid, 9)
    os.close(fd)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
del a
print(json.dumps({
    "limit": limit,
    "pool_error": pool_error,
    "codes": sorted(set(codes)),
    "panics": _native.panic_count(),
}))
"""


def test_more_processes_than_slots_is_a_clear_error_or_works_never_a_panic():
    from conftest import SHM_DIR

    shared_dir = SHM_DIR / f"slots-{os.getpid()}"
    shared_dir.mkdir(mode=0o700)
    try:
        p = run_program(MORE_THAN_SLOTS, env={"MEMSHARE_DIR": str(shared_dir)}, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "panicked" not in p.stderr and "PanicException" not in p.stderr, p.stderr
        r = last_json(p.stdout)
        assert r["codes"] == [0] and r["panics"] == 0, r
        limit = r["limit"]
        assert f"a pool of {limit + 44} worker processes" in r["pool_error"], r
        assert f"of {limit}" in r["pool_error"] and "processes=" in r["pool_error"], r
        assert os.listdir(shared_dir) == []
    finally:
        for name in os.listdir(shared_dir):
            os.unlink(shared_dir / name)
        shared_dir.rmdir()
