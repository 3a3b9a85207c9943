"""Workload (a): the row outer product, written the naive way.

Each task gets the whole 1000x5000 float64 frame (40 MB) and a row label,
draws a random 1000x5000 matrix and returns a 5000x5000 float64 array
(200 MB); the parent sums every result. With ``multiprocessing.Pool`` the
frame is pickled into every task and every result is pickled back: slower
than a plain loop. With ``memshare.Pool`` only the import changes.

    python examples/outer_product.py --mode memshare --tasks 60
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd


def make_frame(rows: int = 1000, cols: int = 5000) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(rng.random((rows, cols)), index=[f"row{i}" for i in range(rows)])


def do_work(args):
    frame, row_label = args
    random = np.random.rand(*frame.shape)
    return np.outer(frame.loc[row_label], random.mean(axis=0))


def run(mode: str, tasks: int, processes: int = 2) -> float:
    """Runs ``tasks`` tasks; returns the sum of all results."""
    frame = make_frame()
    labels = [frame.index[i % len(frame)] for i in range(tasks)]
    total = 0.0
    if mode == "sequential":
        for label in labels:
            total += do_work((frame, label)).sum()
        return total
    if mode == "multiprocessing":
        from multiprocessing import Pool
    elif mode == "threads":  # threads share the frame; numpy releases the GIL
        from multiprocessing.pool import ThreadPool as Pool
    else:
        from memshare import Pool
    with Pool(processes) as pool:
        for result in pool.imap(do_work, ((frame, label) for label in labels)):
            total += result.sum()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mode",
        choices=["sequential", "multiprocessing", "threads", "memshare"],
        default="memshare",
    )
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    t0 = time.perf_counter()
    run(args.mode, args.tasks, args.processes)
    dt = time.perf_counter() - t0
    print(f"{args.mode}: {args.tasks} tasks in {dt:.2f} s = {args.tasks / dt:.2f} tasks/s")


if __name__ == "__main__":
    main()
