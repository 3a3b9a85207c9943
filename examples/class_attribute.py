"""Workload (c): a class whose method maps over its own large attribute.

``pool.map(self.score, ...)`` pickles the bound method, and with it ``self``
and its 200 MB ``data`` attribute, into every chunk of tasks: fork's
copy-on-write does not help, because the pool sends ``self`` explicitly.
memshare's Pool shares ``self.data`` once per call instead.

    python examples/class_attribute.py --mode memshare
"""

from __future__ import annotations

import argparse
import time

import numpy as np


class Model:
    def __init__(self, rows: int = 5000, cols: int = 5000):
        self.data = np.random.default_rng(0).random((rows, cols))  # 200 MB

    def score(self, i: int) -> float:
        row = self.data[i % len(self.data)]
        return float(np.sqrt(row @ row))

    def run(self, mode: str, tasks: int, processes: int = 2) -> list[float]:
        if mode == "sequential":
            return [self.score(i) for i in range(tasks)]
        if mode == "multiprocessing":
            from multiprocessing import Pool
        else:
            from memshare import Pool
        with Pool(processes) as pool:
            return pool.map(self.score, range(tasks), chunksize=max(1, tasks // 16))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mode", choices=["sequential", "multiprocessing", "memshare"], default="memshare"
    )
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    model = Model()
    t0 = time.perf_counter()
    model.run(args.mode, args.tasks, args.processes)
    dt = time.perf_counter() - t0
    print(f"{args.mode}: {args.tasks} tasks in {dt:.2f} s = {args.tasks / dt:.1f} tasks/s")


if __name__ == "__main__":
    main()
