"""Foundation benchmarks: sharing, sending and recycling arrays.

1. ms.share of a 1 GiB float64 array (warm arena) vs np.copy of it.
2. A worker receiving an array and summing it: SharedArray handle vs a plain
   ndarray pickled through multiprocessing.Pool, from 1 MiB to 1 GiB.
3. Allocate-and-free of 40 MB blocks vs multiprocessing.shared_memory.
4. Plain pickling of a shared 1 GiB array (by value): protocol 5 with a
   buffer_callback (the shared pages themselves, out of band) vs protocol 4.
5. A worker's first full read of a received 1 GiB array against a warm
   private read: 4 KiB pages, 4 KiB pages populated ahead of use
   (MEMSHARE_POPULATE=1), and huge pages on a tmpfs mounted huge=always
   (mounted here when run as root and the kernel allows it).
"""

from __future__ import annotations

import gc
import json
import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import tempfile
import time
from multiprocessing import shared_memory
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import REPEAT, conditions, fmt_time, measure, spread, summary, table, thp_setting

import memshare as ms

GiB = 1 << 30


def worker_sum(arr) -> float:
    return float(arr.sum())


def bench_share_vs_copy() -> str:
    src = np.random.default_rng(0).random(GiB // 8)
    ms.share(src)  # warm the arena: the block is recycled below
    gc.collect()
    share = measure(lambda: ms.share(src), repeat=5)
    copy = measure(lambda: np.copy(src), repeat=5)
    rows = [
        ["np.copy (fresh private pages)", spread(copy), "1.00x"],
        ["ms.share (recycled shared block)", spread(share), f"{share[0] / copy[0]:.2f}x"],
    ]
    return table(
        "Copying 1 GiB of float64 (median [min-max] of 5)", ["", "time", "vs np.copy"], rows
    )


def bench_send_and_sum() -> str:
    rows = []
    with mp.get_context("forkserver").Pool(1) as pool:
        pool.apply(worker_sum, (np.zeros(1),))
        for size in (1 << 20, 100 << 20, GiB):
            plain = np.random.default_rng(1).random(size // 8)
            shared = ms.share(plain)
            compute = measure(lambda a=plain: a.sum(), repeat=REPEAT)
            t_plain = measure(lambda a=plain: pool.apply(worker_sum, (a,)), repeat=REPEAT)
            t_shared = measure(lambda a=shared: pool.apply(worker_sum, (a,)), repeat=5)
            handle = len(ForkingPickler.dumps(shared))
            rows.append(
                [
                    f"{size >> 20} MiB",
                    spread(t_plain),
                    spread(t_shared),
                    fmt_time(t_shared[0] - compute[0]),
                    f"{t_plain[0] / t_shared[0]:.1f}x",
                    f"{handle} B",
                ]
            )
            del plain, shared
            gc.collect()
    return table(
        "A worker receives an array and sums it (median [min-max])",
        ["size", "multiprocessing.Pool (pickled)", "ms.SharedArray (handle)",
         "handle path minus the sum itself", "speed-up", "message size"],
        rows,
    )  # fmt: skip


def bench_alloc_free() -> str:
    n, cycles = 40_000_000, 200

    def memshare_cycle():
        for _ in range(cycles):
            a = ms.empty(n // 8)
            a[::512] = 1.0  # touch every page
            del a

    def shm_cycle():
        for _ in range(cycles // 10):
            s = shared_memory.SharedMemory(create=True, size=n)
            np.ndarray(n // 8, buffer=s.buf)[::512] = 1.0
            s.close()
            s.unlink()

    t_ms = measure(memshare_cycle, repeat=REPEAT)[0] / cycles
    t_shm = measure(shm_cycle, repeat=REPEAT)[0] / (cycles // 10)
    return table(
        "Allocate, touch every page, free: 40 MB blocks (median per cycle)",
        ["", "per cycle", "vs SharedMemory"],
        [
            ["multiprocessing.shared_memory.SharedMemory", fmt_time(t_shm), "1.00x"],
            ["ms.empty (recycled block)", fmt_time(t_ms), f"{t_shm / t_ms:.0f}x faster"],
        ],
    )


def bench_pickle_by_value() -> str:
    shared = ms.share(np.random.default_rng(2).random(GiB // 8))

    def oob():
        buffers: list[pickle.PickleBuffer] = []
        data = pickle.dumps(shared, protocol=5, buffer_callback=buffers.append)
        return len(data) + sum(b.raw().nbytes for b in buffers)

    t5 = measure(oob, repeat=5)
    t4 = measure(lambda: pickle.dumps(shared, protocol=4), repeat=3)
    rows = [
        ["protocol=4 (data copied into the pickle)", spread(t4), "1.00x"],
        ["protocol=5, buffer_callback (shared pages out of band)", spread(t5),
         f"{t4[0] / t5[0]:.0f}x faster"],
    ]  # fmt: skip
    return table(
        "pickle.dumps of a shared 1 GiB float64 array, by value (median [min-max])",
        ["", "time", "vs protocol 4"],
        rows,
    )


# --- first read of a received array --------------------------------------------------


def _first_read_consumer(q, back, reps):
    private = np.ones(GiB // 8)
    private.sum()  # faulted in: a warm private read from now on
    warm = []
    for _ in range(reps):
        t0 = time.perf_counter()
        private.sum()
        warm.append(time.perf_counter() - t0)
    del private
    first = []
    for _ in range(reps):
        a = q.get(timeout=600)
        t0 = time.perf_counter()
        a.sum()  # the first full read of this block in this process
        first.append(time.perf_counter() - t0)
        del a
        back.put(None)
    back.put((warm, first))


def first_read_run(reps: int) -> dict:
    """In this process (its environment chose the page size and populating):
    a consumer's first read of each of ``reps`` received 1 GiB arrays."""
    ctx = mp.get_context("forkserver")
    q, back = ms.Queue(2), ms.Queue(2)
    p = ctx.Process(target=_first_read_consumer, args=(q, back, reps))
    p.start()
    for _ in range(reps):
        a = ms.empty(GiB // 8)
        a[:] = 1.0  # written by the producer: the consumer has no page tables for it
        q.put(a, timeout=600)
        del a
        back.get(timeout=600)
    warm, first = back.get(timeout=600)
    p.join(60)
    return {"warm": warm, "first": first}


def _huge_tmpfs() -> tuple[str | None, str]:
    """(directory of a tmpfs mounted huge=always, why not) for this run."""
    if os.geteuid() != 0:
        return None, "not root: cannot mount a tmpfs with huge=always"
    d = tempfile.mkdtemp(prefix="memshare-huge-")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "huge=always,size=3G,mode=0700", "tmpfs", d],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        os.rmdir(d)
        return None, f"mount -o huge=always refused: {r.stderr.strip()}"
    return d, ""


def bench_first_read() -> str:
    reps = REPEAT
    cases = [
        ("4 KiB pages (default)", {}),
        ("4 KiB pages, MEMSHARE_POPULATE=1", {"MEMSHARE_POPULATE": "1"}),
    ]
    huge, why = _huge_tmpfs()
    if huge:
        cases.append(
            ("huge pages: MEMSHARE_DIR on a tmpfs mounted huge=always", {"MEMSHARE_DIR": huge})
        )
    rows = []
    try:
        for name, env in cases:
            out = subprocess.run(
                [sys.executable, __file__, "--first-read", str(reps)],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                timeout=1800,
            )
            if out.returncode != 0:
                rows.append([name, "failed", out.stderr.strip().splitlines()[-1:], "", ""])
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            warm, first = summary(r["warm"]), summary(r["first"])
            rows.append([name, spread(first), spread(warm), f"{first[0] / warm[0]:.2f}x"])
    finally:
        if huge:
            subprocess.run(["umount", huge], check=False)
            os.rmdir(huge)
    if not huge:
        rows.append(["huge pages", "not measured", why, ""])
    shmem = thp_setting("shmem_enabled")
    return table(
        f"A worker's first full read (sum) of a received 1 GiB array vs a warm private read "
        f"(median [min-max] of {reps}; goal: at most 1.15x). shmem_enabled: {shmem}",
        ["pages", "first read of the received array", "warm private read", "ratio"],
        rows,
    )


def main() -> None:
    if sys.argv[1:2] == ["--first-read"]:
        print(json.dumps(first_read_run(int(sys.argv[2]))))
        return
    print("## Foundation: SharedArray\n")
    print(f"_{conditions()}_\n")
    t0 = time.perf_counter()
    print(bench_share_vs_copy())
    print(bench_send_and_sum())
    print(bench_alloc_free())
    print(bench_pickle_by_value())
    print(bench_first_read())
    print(f"_bench_array took {time.perf_counter() - t0:.0f} s_\n")


if __name__ == "__main__":
    main()
