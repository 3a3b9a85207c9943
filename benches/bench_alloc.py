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
    start.get(timeout=600)  # everyone starts together
    t0 = time.perf_counter()
    for _ in range(n):
        a = ms.empty(ELEMENTS)
        del a
    t1 = time.perf_counter()
    out.put((t0, t1, ms.stats().get("lock_acquisitions", 0) - before))


def run(processes: int) -> tuple[float, float]:
    """(cycles/s of all processes together, lock acquisitions per cycle)."""
    start, out = ms.Queue(), ms.Queue()
    ps = [CTX.Process(target=_cycles, args=(start, out, CYCLES)) for _ in range(processes)]
    for p in ps:
        p.start()
    for _ in ps:
        start.put(None)
    results = [out.get(timeout=600) for _ in ps]
    for p in ps:
        p.join(60)
    t0 = min(r[0] for r in results)
    t1 = max(r[1] for r in results)
    locks = sum(r[2] for r in results)
    return processes * CYCLES / (t1 - t0), locks / (processes * CYCLES)


SCALING = """\
### How the allocation design scales to 64 or more cores

Today every allocation, free, handle sent and handle received takes the one
arena-wide robust mutex for a few hundred nanoseconds (best-fit bins, a
holder bit, a pin slot). On 2 cores that lock is never the bottleneck (the
table above: the rate of several processes is that of the cores, not of the
lock). It will be at 64 cores: a futex-backed mutex that many processes
contend for serialises them, and its cache line moves between cores on every
acquisition, so the rate of the whole machine stays that of one core
(roughly 1-3 million transactions/s) while the work per core shrinks. The
figures that tell how close a workload is: `ms.stats()["lock_acquisitions"]`
per task (see the Pool and Queue tables: workload (a) takes about 17 per task
today, the goal is 4).

The design that scales (not built yet; the counts above are its baseline):

1. **Per-process caches of free blocks in size classes** (powers of two from
   64 KiB up to the segment growth step). A free goes to the freeing
   process's cache when it is the block's last holder; an allocation of that
   class is served from the cache with no shared lock. The shared heap sees
   only batches: a cache over its budget (e.g. 64 MiB or 8 blocks per class)
   returns half of it in one transaction, so N frees cost N/8 lock
   acquisitions instead of N.
2. **Ownership stays in shared memory.** A cached block keeps a header state
   CACHED with the owner's (slot, epoch), so crash repair, which already runs
   under the mutex when a holder dies (EOWNERDEAD) or when `reap` finds a
   dead slot, returns a dead process's cached blocks to the bins exactly as it
   frees its held blocks. On exit the process flushes its caches in one
   transaction.
3. **Hand-offs without the lock.** Sending a handle pins the block in the
   pin table (one transaction) and receiving consumes it (another). With a
   per-process pin range (each slot owns a slice of the pin table; only its
   owner writes it, the receiver clears it with one atomic compare-exchange)
   both go lock-free; the holder bitmap is already per slot and can be set
   with an atomic OR.
4. **More arenas than one.** Past a few hundred cores even batched traffic
   on one lock is a hotspot; the control header can hold several heaps (one
   per NUMA node or per group of slots), each with its own mutex, and a block
   reference already names its segment, so a free finds its heap without a
   lookup.

With 1-3, a task that receives a cached frame and returns a result of a
cached size class takes no shared lock in the steady state; the mutex is left
for growth, batch returns and repair, whose rate does not grow with the core
count.
"""


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
    print(SCALING)


if __name__ == "__main__":
    main()
