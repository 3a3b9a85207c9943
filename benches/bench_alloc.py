"""Allocation-plus-free throughput of the shared heap with 1, 2, 4 and 8
processes allocating at once (oversubscribed beyond the core count), and the
arena-lock acquisitions each cycle takes. Prints Markdown tables; no
assertions.

Each process runs ``CYCLES`` cycles of ``ms.empty`` (64 KiB) then drops it;
the figure is the total cycles per second of all processes, from the first
start to the last end (median of REPEAT runs, min-max).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import REPEAT, conditions, summary, table

import memshare as ms

CTX = mp.get_context("forkserver")
CYCLES = 20_000
ELEMENTS = 8192  # 64 KiB of float64


def _cycles(start, out, n: int) -> None:
    ms.empty(ELEMENTS)  # attach and map before the clock starts
    before = ms.stats().get("lock_acquisitions", 0)
    start.wait(600)
    t0 = time.perf_counter()
    for _ in range(n):
        a = ms.empty(ELEMENTS)
        del a
    t1 = time.perf_counter()
    out.put((t0, t1, ms.stats().get("lock_acquisitions", 0) - before))


def run(processes: int) -> tuple[float, float]:
    """(cycles/s of all processes together, lock acquisitions per cycle)."""
    start, out = CTX.Event(), CTX.Queue()
    ps = [CTX.Process(target=_cycles, args=(start, out, CYCLES)) for _ in range(processes)]
    for p in ps:
        p.start()
    start.set()
    results = [out.get(timeout=600) for _ in ps]
    for p in ps:
        p.join(60)
    t0 = min(r[0] for r in results)
    t1 = max(r[1] for r in results)
    locks = sum(r[2] for r in results)
    return processes * CYCLES / (t1 - t0), locks / (processes * CYCLES)


def main() -> None:
    print("## Allocation\n")
    print(f"_{conditions()}_\n")
    ms.empty(1)  # the parent makes the arena the children join
    rows = []
    base = None
    for n in (1, 2, 4, 8):
        runs = [run(n) for _ in range(REPEAT)]
        rate = summary([r[0] for r in runs])
        base = base or rate[0]
        rows.append(
            [
                n,
                f"{rate[0]:,.0f} [{rate[1]:,.0f}-{rate[2]:,.0f}]",
                f"{rate[0] / base:.2f}x",
                f"{runs[0][1]:.1f}",
            ]
        )
    print(
        table(
            f"Allocate and free 64 KiB (ms.empty + del), {CYCLES:,} cycles per process, "
            f"{os.cpu_count()} cores (median [min-max] of {REPEAT})",
            [
                "processes",
                "cycles/s, all processes",
                "vs 1 process",
                "arena-lock acquisitions per cycle",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
