"""Randomized fault injection: SIGKILL pool workers, queue producers and
consumers, and whole process trees at random points of the Pool and Queue
paths. Every scenario checks that the survivors finish within a bound, that
what was delivered is intact (checksums), and that nothing is left: the
autouse fixture checks the arena, and each scenario checks the segment files.

``make test`` runs 200 scenarios; ``pytest -m slow`` runs 600 more.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

import memshare as ms
from memshare import _native

T = 60  # bound of every blocking call, seconds

N_POOL, N_QUEUE, N_TREE = 80, 80, 40
SLOW = 200  # extra scenarios of each kind under -m slow


def checksum(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).view(np.uint8))


def our_files() -> set[str]:
    token = _native.arena_token()
    return {p.name for p in Path(_native.shm_dir()).iterdir() if token not in p.name}


# --- pool scenarios -----------------------------------------------------------


class KillWhilePickled:
    """A result whose pickling kills the worker: dies mid-pickle of a handle."""

    def __init__(self, arr):
        self.arr = arr

    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)
        return (KillWhilePickled, (self.arr,))


def pool_task(src, i, victim, point):
    row = np.asarray(src[i % len(src)])
    if i == victim and point == "start":
        os.kill(os.getpid(), signal.SIGKILL)
    out = np.outer(row, row[:64])  # large enough for the allocator hook
    if i == victim and point == "after_alloc":
        os.kill(os.getpid(), signal.SIGKILL)
    shared = ms.share(out) if i % 3 == 0 else out
    if i == victim and point == "mid_pickle":
        return KillWhilePickled(shared)
    return i, checksum(out), shared


POOL_POINTS = ["start", "after_alloc", "mid_pickle", "external", "none"]


def run_pool_scenario(seed: int) -> None:
    rng = random.Random(seed)
    method = rng.choice(["fork", "fork", "forkserver", "spawn"])
    src = ms.share(np.random.default_rng(seed).random((16, 4096)))
    n_tasks = rng.randint(4, 24)
    victim = rng.randrange(n_tasks)
    point = rng.choice(POOL_POINTS)
    expected = {}
    for i in range(n_tasks):
        row = np.asarray(src[i % len(src)])
        expected[i] = checksum(np.outer(row, row[:64]))
    with ms.Pool(2, context=mp.get_context(method)) as pool:
        it = pool.imap_unordered(
            _star_pool_task, [(src, i, victim, point) for i in range(n_tasks)], chunksize=1
        )
        got = 0
        kill_after = rng.randint(0, n_tasks - 1)
        try:
            while True:
                try:
                    i, crc, arr = it.next(timeout=T)
                except StopIteration:
                    break
                assert crc == expected[i] == checksum(arr), f"seed {seed}: corrupt result"
                del arr
                got += 1
                if point == "external" and got == kill_after + 1:
                    rng.choice(pool._pool).kill()  # no pid race with a reaped worker
        except ms.WorkerLostError:
            assert point != "none", f"seed {seed}: no kill, yet a worker was lost"
        else:
            assert got == n_tasks or point == "external", f"seed {seed}: {got}/{n_tasks}"
        pool.terminate()
    del src


def _star_pool_task(args):
    return pool_task(*args)


@pytest.mark.parametrize("seed", range(N_POOL))
def test_pool_worker_killed(seed):
    before = our_files()
    run_pool_scenario(seed)
    ms.reap()
    assert our_files() <= before


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(N_POOL, N_POOL + SLOW))
def test_pool_worker_killed_slow(seed):
    run_pool_scenario(seed)


# --- queue scenarios -----------------------------------------------------------


def producer(q, pid, n, die_at, started):
    started.set()  # arguments unpickled: the queue's pin is adopted
    rng = np.random.default_rng(pid)
    for seq in range(n):
        arr = rng.random(rng.integers(1, 40_000))
        if seq == die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        q.put((pid, seq, checksum(arr), arr), timeout=T)


def consumer(q, report_path, die_at, started):
    # One line per message, written with a single write(): a consumer killed
    # mid-report leaves at most a partial last line, which the parent ignores.
    fd = os.open(report_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    started.set()
    got = 0
    while True:
        item = q.get(timeout=T)
        if item is None:
            break
        pid, seq, crc, arr = item
        ok = checksum(arr) == crc and (ms.is_shared(arr) or arr.nbytes < ms.DEFAULT_SHARE_THRESHOLD)
        del arr
        if got == die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        os.write(fd, f"{pid} {seq} {int(ok)}\n".encode())
        got += 1
    os.close(fd)


def read_reports(paths):
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().split("\n"):
            parts = line.split()
            if len(parts) == 3:
                yield int(parts[0]), int(parts[1]), parts[2] == "1"


def run_queue_scenario(seed: int, tmp: Path) -> None:
    rng = random.Random(seed)
    ctx = mp.get_context(rng.choice(["fork", "fork", "forkserver"]))
    q = ms.Queue(maxsize=rng.choice([1, 2, 8, 64]))
    n_prod, n_cons, n = rng.randint(1, 3), rng.randint(2, 3), rng.randint(5, 60)
    victim_kind = rng.choice(["producer", "consumer", "none"])
    external = rng.random() < 0.5  # kill from outside at a random instant
    die_at = rng.randrange(n) if not external else -1
    paths = [tmp / f"consumer-{seed}-{c}" for c in range(n_cons)]
    started = [ctx.Event() for _ in range(n_prod + n_cons)]
    prods = [
        ctx.Process(
            target=producer,
            args=(q, p, n, die_at if victim_kind == "producer" and p == 0 else -1, started[p]),
        )
        for p in range(n_prod)
    ]
    cons = [
        ctx.Process(
            target=consumer,
            args=(
                q,
                paths[c],
                die_at if victim_kind == "consumer" and c == 0 else -1,
                started[n_prod + c],
            ),
        )
        for c in range(n_cons)
    ]
    for p in prods + cons:
        p.start()
    # A child killed before it unpickled its arguments would leave the pin of
    # the queue's handle with this (live) process: kill only running children.
    for e in started:
        assert e.wait(T)
    if external and victim_kind != "none":
        time.sleep(rng.uniform(0, 0.3))  # a random instant, not synchronisation
        victim = prods[0] if victim_kind == "producer" else cons[0]
        try:
            os.kill(victim.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it finished first
    for p in prods:
        p.join(T)
        assert p.exitcode is not None, f"seed {seed}: producer hung"
    for _ in range(n_cons):
        q.put(None, timeout=T)
    for c in cons:
        c.join(T)
        assert c.exitcode is not None, f"seed {seed}: consumer hung"
    seen = set()
    for pid, seq, ok in read_reports(paths):
        assert ok, f"seed {seed}: corrupt message {pid}/{seq}"
        assert (pid, seq) not in seen, f"seed {seed}: duplicated {pid}/{seq}"
        seen.add((pid, seq))
    killed_consumers = int(victim_kind == "consumer" and cons[0].exitcode == -signal.SIGKILL)
    for p in range(n_prod):
        if victim_kind == "producer" and p == 0 and prods[0].exitcode == -signal.SIGKILL:
            continue  # it sent what it put before dying
        got = sum(1 for (pid, _) in seen if pid == p)
        assert got >= n - killed_consumers, f"seed {seed}: producer {p} lost {n - got} messages"
    while True:  # sentinels a dead consumer did not take
        try:
            q.get_nowait()
        except Exception:
            break
    del q


@pytest.mark.parametrize("seed", range(N_QUEUE))
def test_queue_peer_killed(seed, tmp_path):
    before = our_files()
    run_queue_scenario(seed, tmp_path)
    ms.reap()
    assert our_files() <= before


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(N_QUEUE, N_QUEUE + SLOW))
def test_queue_peer_killed_slow(seed, tmp_path):
    run_queue_scenario(seed, tmp_path)


# --- whole trees killed -------------------------------------------------------

TREE = """
import os, sys, random, numpy as np, multiprocessing as mp, memshare as ms

def work(a, i):
    return np.outer(a[i], a[i]).sum(), ms.share(np.full(10_000, i))

def main():
    rng = random.Random(int(sys.argv[1]))
    a = ms.share(np.random.default_rng(0).random((32, 2000)))
    q = ms.Queue(8)
    print("ready", flush=True)
    with ms.Pool(2, context=mp.get_context(rng.choice(["fork", "forkserver"]))) as pool:
        while True:  # until killed
            for s, b in pool.starmap(work, [(a, i) for i in range(8)]):
                q.put(b)
                q.get()

if __name__ == "__main__":
    main()
"""


def mapped_semaphores(pgid: int | None = None) -> set[int]:
    """The inodes of the POSIX semaphores (multiprocessing's named
    semaphores, glibc's sem_open temporaries) mapped by the live processes of
    process group `pgid`, or by any live process. By inode, not by name: the
    process that makes a semaphore maps it under glibc's temporary name
    (linked to the final name, then removed), so its maps show
    "/dev/shm/sem.XXXXXX (deleted)" for what is "/dev/shm/sem.mp-..." now."""
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            if pgid is not None and int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            for line in (proc / "maps").read_text().splitlines():
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/dev/shm/sem."):
                    found.add(int(fields[4]))
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
    return found


def stdlib_semaphores() -> set[Path]:
    # sem.mp-*: named semaphores; sem.XXXXXX: glibc sem_open temporaries of
    # a process killed inside sem_open.
    return set(Path("/dev/shm").glob("sem.*"))


def run_tree_scenario(seed: int) -> None:
    rng = random.Random(seed)
    semaphores_before = stdlib_semaphores()
    with tempfile.TemporaryDirectory(prefix="memshare-tree-", dir="/dev/shm") as d:
        env = {k: v for k, v in os.environ.items() if k != "MEMSHARE_ARENA"}
        env["MEMSHARE_DIR"] = d
        p = subprocess.Popen(
            [sys.executable, "-c", TREE, str(seed)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            assert p.stdout.readline().strip() == "ready"
            # Run for a random while, observed by the arena's allocation count.
            target = rng.randint(1, 30)
            deadline = time.monotonic() + T
            while time.monotonic() < deadline:
                listing = [x for x in _native.list_arenas(d) if "live_blocks" in x]
                if listing and listing[0]["live_blocks"] >= 1 and target <= 0:
                    break
                target -= 1
            # Stop the whole tree (no new semaphores), note the semaphores it
            # holds, then kill it at once; killing also ends the stop.
            own_semaphores: set[int] = set()
            try:
                os.killpg(p.pid, signal.SIGSTOP)
                own_semaphores = mapped_semaphores(p.pid)
            except ProcessLookupError:
                pass
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        finally:
            p.kill()
            p.communicate(timeout=T)
        # Wait (bounded) until no process of the tree is left.
        deadline = time.monotonic() + T
        while time.monotonic() < deadline:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
        # multiprocessing's named semaphores die with their resource tracker
        # only if it survives; this tree's tracker was killed with it. Only
        # this tree's: other programs (and test sessions) run beside us. The
        # tree's are those it mapped when stopped, and those made while it ran
        # that no live process maps (made by a process of the tree that had
        # closed them, or exited, before the stop).
        made = stdlib_semaphores() - semaphores_before
        mapped = mapped_semaphores()
        for sem in made:
            with contextlib.suppress(FileNotFoundError):
                inode = sem.stat().st_ino
                if inode in own_semaphores or inode not in mapped:
                    sem.unlink()
        files = os.listdir(d)
        assert files, "the tree had created an arena"
        # The next memshare start in that directory removes what the dead left.
        out = subprocess.run(
            [sys.executable, "-c", "import memshare as ms, numpy as np; ms.share(np.ones(3))"],
            env=env,
            timeout=T,
        )
        assert out.returncode == 0
        assert os.listdir(d) == [], f"seed {seed}: left behind {os.listdir(d)}"


@pytest.mark.parametrize("seed", range(N_TREE))
def test_whole_tree_killed(seed):
    run_tree_scenario(seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(N_TREE, N_TREE + SLOW))
def test_whole_tree_killed_slow(seed):
    run_tree_scenario(seed)
