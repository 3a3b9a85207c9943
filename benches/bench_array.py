"""Foundation benchmarks: sharing, sending and recycling arrays.

1. ms.share of a 1 GiB float64 array (warm arena) vs np.copy of it.
2. A worker receiving an array and summing it: SharedArray handle vs a plain
   ndarray pickled through multiprocessing.Pool, from 1 MiB to 1 GiB.
3. Allocate-and-free of 40 MB blocks vs multiprocessing.shared_memory.
4. Plain pickling of a shared 1 GiB array (by value): protocol 5 with a
   buffer_callback (the shared pages themselves, out of band) vs protocol 4.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import pickle
import sys
import time
from multiprocessing import shared_memory
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import fmt_time, measure, spread, table

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
            compute = measure(lambda a=plain: a.sum(), repeat=3)
            t_plain = measure(lambda a=plain: pool.apply(worker_sum, (a,)), repeat=3)
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

    t_ms = measure(memshare_cycle, repeat=3)[0] / cycles
    t_shm = measure(shm_cycle, repeat=3)[0] / (cycles // 10)
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


def main() -> None:
    print("## Foundation: SharedArray\n")
    t0 = time.perf_counter()
    print(bench_share_vs_copy())
    print(bench_send_and_sum())
    print(bench_alloc_free())
    print(bench_pickle_by_value())
    print(f"_bench_array took {time.perf_counter() - t0:.0f} s_\n")


if __name__ == "__main__":
    main()
