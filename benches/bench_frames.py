"""Benchmark: sharing a large mixed-dtype DataFrame with worker processes.

For a frame of floats, ints, strings (pandas ``str``), a categorical and a
datetime column it measures, in one run:

* ``memshare``: ``ms.share(df)`` once, then a Pool task that receives the
  frame and sums its numeric columns (the frame travels as handles);
* ``mp.Pool pickle``: the same task with the plain frame pickled through a
  ``multiprocessing.Pool`` (run in a child interpreter that never imports
  memshare, so memshare's reducers cannot help it);
* ``df.values + shared_memory``: the well-known recipe: numeric columns as one
  float64 ``df.values`` block in ``multiprocessing.shared_memory``, rebuilt by
  hand in the worker (strings, categoricals and datetimes are lost).

Prints a table with the ratios to memshare. No timing is asserted.

    python benches/bench_frames.py [--size-mb 1024] [--repeat 5] [--start-method forkserver]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import subprocess
import sys
import time

import numpy as np


def make_frame(size_mb: int, seed: int = 0):
    """A ~size_mb frame: 2 float64, 1 int64, 1 str, 1 categorical, 1 datetime."""
    import pandas as pd

    n = max(1, size_mb * (1 << 20) // 68)  # ~8+8+8+8+1 numeric bytes + ~35 string bytes a row
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, n).astype("i1")
    words = np.array([f"w{i:05d}-" + "x" * (i % 40) for i in range(5000)], dtype=object)
    return pd.DataFrame(
        {
            "a": rng.random(n),
            "b": rng.random(n),
            "i": rng.integers(0, 1 << 40, n),
            "s": pd.array(words[rng.integers(0, len(words), n)], dtype="str"),
            "c": pd.Categorical.from_codes(codes, list("abcdefghijklmnop")),
            "t": pd.date_range("2000-01-01", periods=n, freq="s"),
        }
    )


def frame_bytes(df) -> int:
    return int(df.memory_usage(index=True, deep=False).sum())


def sum_numeric(df) -> float:
    return float(sum(float(df[c].sum()) for c in df.columns if df[c].dtype.kind in "fi"))


def sum_from_shm(name: str, shape: tuple, columns: list) -> float:
    """Worker side of the df.values recipe: attach, rebuild by hand, sum."""
    from multiprocessing import shared_memory

    import pandas as pd

    shm = shared_memory.SharedMemory(name=name)
    try:
        arr = np.ndarray(shape, dtype=np.float64, buffer=shm.buf)
        df = pd.DataFrame(arr, columns=columns, copy=False)
        total = sum_numeric(df)
        del df, arr
    finally:
        shm.close()
    return total


def timed(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


# --------------------------------------------------------------------------
# baselines (run in a child interpreter without memshare)
# --------------------------------------------------------------------------


def run_baselines(size_mb: int, repeat: int, method: str) -> dict:
    import pickle
    from multiprocessing import shared_memory

    assert "memshare" not in sys.modules
    df = make_frame(size_mb)
    ctx = mp.get_context(method)
    res: dict = {}
    with ctx.Pool(1) as pool:
        pool.apply(sum_numeric, (df.head(10),))  # start the worker and its imports
        res["pickle_bytes"] = len(pickle.dumps(df, protocol=pickle.HIGHEST_PROTOCOL))
        res["pickle_task"], res["pickle_sum"] = timed(
            lambda: pool.apply(sum_numeric, (df,)), repeat
        )

        numeric = [c for c in df.columns if df[c].dtype.kind in "fi"]

        def prepare():
            values = df[numeric].to_numpy(dtype=np.float64)
            shm = shared_memory.SharedMemory(create=True, size=values.nbytes)
            np.ndarray(values.shape, np.float64, buffer=shm.buf)[:] = values
            return shm, values.shape

        res["recipe_share"], (shm, shape) = timed(prepare, 1)
        try:
            res["recipe_task"], res["recipe_sum"] = timed(
                lambda: pool.apply(sum_from_shm, (shm.name, shape, numeric)), repeat
            )
        finally:
            shm.close()
            shm.unlink()
    return res


# --------------------------------------------------------------------------
# memshare
# --------------------------------------------------------------------------


def run_memshare(size_mb: int, repeat: int, method: str) -> dict:
    from multiprocessing.reduction import ForkingPickler

    import memshare as ms
    from memshare import _frames

    _frames.install()
    df = make_frame(size_mb)
    res: dict = {"frame_bytes": frame_bytes(df)}
    ctx = mp.get_context(method)
    shared = None

    def share():
        nonlocal shared
        shared = None
        shared = ms.share(df)

    t0 = time.perf_counter()
    share()
    res["share_cold"] = time.perf_counter() - t0  # fresh pages: first touch
    res["share"], _ = timed(share, repeat)  # freed blocks are recycled
    data = bytes(ForkingPickler.dumps(shared))
    ForkingPickler.loads(data)  # receive the handles we sent
    res["handle_bytes"] = len(data)
    with ctx.Pool(1) as pool:
        pool.apply(sum_numeric, (shared.head(10),))
        res["task"], res["sum"] = timed(lambda: pool.apply(sum_numeric, (shared,)), repeat)
    res["local_sum"] = sum_numeric(df)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--start-method", default="forkserver", choices=mp.get_all_start_methods())
    ap.add_argument("--baselines-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.baselines_only:
        print(json.dumps(run_baselines(args.size_mb, args.repeat, args.start_method)))
        return

    child = subprocess.run(
        [sys.executable, __file__, "--baselines-only", f"--size-mb={args.size_mb}",
         f"--repeat={args.repeat}", f"--start-method={args.start_method}"],
        capture_output=True, text=True, check=True, timeout=3600,
    )  # fmt: skip
    base = json.loads(child.stdout.strip().splitlines()[-1])
    ms_res = run_memshare(args.size_mb, args.repeat, args.start_method)

    for key in ("pickle_sum", "recipe_sum", "sum"):
        value = base.get(key, ms_res.get(key))
        assert np.isclose(value, ms_res["local_sum"]), (key, value, ms_res["local_sum"])

    mb = ms_res["frame_bytes"] / 2**20
    print(f"\nFrame: {mb:.0f} MB, mixed dtypes (2x float64, int64, str, categorical, datetime)")
    print(f"Start method: {args.start_method}; median of {args.repeat} runs\n")
    rows = [
        ("memshare (ms.share + handles)", ms_res["share"], ms_res["task"], ms_res["handle_bytes"]),
        ("mp.Pool, frame pickled", 0.0, base["pickle_task"], base["pickle_bytes"]),
        ("df.values + shared_memory*", base["recipe_share"], base["recipe_task"], None),
    ]
    head = f"{'method':32} {'share (s)':>10} {'task (s)':>10} {'vs memshare':>12}"
    head += f" {'sent per task':>14}"
    print(head)
    print("-" * len(head))
    for name, share_t, task_t, sent in rows:
        ratio = task_t / ms_res["task"]
        sent_s = "-" if sent is None else f"{sent / 1024:,.1f} KiB"
        print(f"{name:32} {share_t:10.3f} {task_t:10.4f} {ratio:11.1f}x {sent_s:>14}")
    print(
        f"\nms.share: {ms_res['share_cold']:.3f} s the first time (fresh shared pages), "
        f"{ms_res['share']:.3f} s again (recycled pages).\n"
        "'task' = a Pool worker receives the frame and sums its numeric columns.\n"
        "* numeric columns only, as one float64 block; strings, categorical and\n"
        "  datetime dtypes do not survive the recipe.\n"
        f"memshare sends {ms_res['handle_bytes']:,} bytes for a {mb:.0f} MB frame "
        f"({100 * ms_res['handle_bytes'] / ms_res['frame_bytes']:.4f}% of its data)."
    )


if __name__ == "__main__":
    main()
