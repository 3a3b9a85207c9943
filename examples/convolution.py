"""Workload (b): a 20x20 convolution of the whole frame per task, naive way.

Each task gets the 1000x5000 float64 frame (40 MB) and a kernel seed,
convolves the whole frame with a 20x20 kernel (``scipy.ndimage.convolve``)
and returns the filtered frame (40 MB). Compute-bound: with memshare the
frame is shared once and results come back by handle, so two workers give
close to 2x.

    python examples/convolution.py --mode memshare --tasks 8
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from scipy import ndimage


def make_frame(rows: int = 1000, cols: int = 5000) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(rng.random((rows, cols)))


def do_work(args):
    frame, seed = args
    kernel = np.random.default_rng(seed).random((20, 20))
    kernel /= kernel.sum()
    return ndimage.convolve(frame.to_numpy(), kernel, mode="reflect")


def run(mode: str, tasks: int, processes: int = 2, rows: int = 1000) -> float:
    """Runs ``tasks`` convolutions; returns the sum of all results."""
    frame = make_frame(rows)
    total = 0.0
    if mode == "sequential":
        for seed in range(tasks):
            total += do_work((frame, seed)).sum()
        return total
    if mode == "multiprocessing":
        from multiprocessing import Pool
    else:
        from memshare import Pool
    with Pool(processes) as pool:
        for result in pool.imap(do_work, ((frame, seed) for seed in range(tasks))):
            total += result.sum()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mode", choices=["sequential", "multiprocessing", "memshare"], default="memshare"
    )
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    t0 = time.perf_counter()
    run(args.mode, args.tasks, args.processes)
    dt = time.perf_counter() - t0
    print(f"{args.mode}: {args.tasks} tasks in {dt:.2f} s = {args.tasks / dt:.2f} tasks/s")


if __name__ == "__main__":
    main()
