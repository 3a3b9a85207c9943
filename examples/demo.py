"""`make demo`: the naive parallel code, three ways.

Runs workload (a) (row outer product: 40 MB frame in, 200 MB array out per
task) and workload (b) (20x20 convolution of the whole frame per task) as a
plain loop, with ``multiprocessing.Pool`` and with ``memshare.Pool`` — the
same code, only the import differs (see outer_product.py and convolution.py)
— and prints tasks/s and ratios. Takes about a minute on 2 cores.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import convolution
import outer_product

MODES = ["sequential", "multiprocessing", "memshare"]
LABELS = {
    "sequential": "sequential loop",
    "multiprocessing": "multiprocessing.Pool",
    "memshare": "memshare.Pool",
}


def timed(run, mode: str, tasks: int) -> float:
    t0 = time.perf_counter()
    run(mode, tasks)
    return tasks / (time.perf_counter() - t0)


def main() -> None:
    workloads = [
        ("(a) row outer product", outer_product.run, 24),
        ("(b) 20x20 convolution", convolution.run, 10),
    ]
    print(f"memshare demo on {os.cpu_count()} cores, 2 worker processes\n")
    outer_product.run("memshare", 2)  # warm the shared memory up once
    for title, run, tasks in workloads:
        speeds = {}
        for mode in MODES:
            print(f"  {title}: {LABELS[mode]} ...", end="", flush=True)
            speeds[mode] = timed(run, mode, tasks)
            print(f" {speeds[mode]:.2f} tasks/s")
        print(f"\n{title}, {tasks} tasks")
        print(f"  {'':22} {'tasks/s':>8} {'vs loop':>8} {'vs Pool':>8}")
        for mode in MODES:
            s = speeds[mode]
            print(
                f"  {LABELS[mode]:22} {s:8.2f} {s / speeds['sequential']:7.2f}x "
                f"{s / speeds['multiprocessing']:7.2f}x"
            )
        print()


if __name__ == "__main__":
    main()
