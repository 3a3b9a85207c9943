"""memshare.Pool against a sequential loop, multiprocessing.Pool and the
hand-written multiprocessing.shared_memory recipe, on the reference workloads
(examples/outer_product.py, convolution.py, class_attribute.py), and the
per-task overhead of tiny tasks. Prints Markdown tables; no assertions.

Each figure is the median of several runs (spread in brackets); ratios are
computed from medians measured in this same run. 2 worker processes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import warnings
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benches"))

import class_attribute
import convolution
import outer_product
from _util import measure, spread, table

import memshare as ms

WORKERS = 2
REPEAT = int(os.environ.get("BENCH_REPEAT", "3"))


# --- the multiprocessing.shared_memory recipe for workload (a) -------------------


def _recipe_work(args):
    name, shape, row = args
    shm = shared_memory.SharedMemory(name=name)
    values = np.ndarray(shape, np.float64, buffer=shm.buf)
    random = np.random.rand(*shape)
    result = np.outer(values[row], random.mean(axis=0))
    out = shared_memory.SharedMemory(create=True, size=result.nbytes)
    np.ndarray(result.shape, result.dtype, buffer=out.buf)[:] = result
    # The parent unlinks it; keep the resource tracker from doing it too.
    resource_tracker.unregister(out._name, "shared_memory")
    out_name = out.name
    del values
    shm.close()
    out.close()
    return out_name, result.shape


def recipe_outer_product(tasks: int) -> float:
    frame = outer_product.make_frame()
    values = np.ascontiguousarray(frame.to_numpy())
    shm = shared_memory.SharedMemory(create=True, size=values.nbytes)
    np.ndarray(values.shape, values.dtype, buffer=shm.buf)[:] = values
    rows = [frame.index.get_loc(frame.index[i % len(frame)]) for i in range(tasks)]
    total = 0.0
    try:
        with mp.Pool(WORKERS) as pool:
            for name, shape in pool.imap(_recipe_work, ((shm.name, values.shape, r) for r in rows)):
                res = shared_memory.SharedMemory(name=name)
                arr = np.ndarray(shape, np.float64, buffer=res.buf)
                total += arr.sum()
                del arr
                res.close()
                res.unlink()
    finally:
        shm.close()
        shm.unlink()
    return total


# --- tables ---------------------------------------------------------------------------


def ratio(a: float, b: float) -> str:
    return f"{b / a:.2f}x"


def bench_outer_product(tasks: int = 60) -> str:
    m = {
        "sequential loop": measure(lambda: outer_product.run("sequential", tasks), REPEAT, 0),
        "memshare.Pool": measure(lambda: outer_product.run("memshare", tasks), REPEAT, 1),
        "shared_memory recipe": measure(lambda: recipe_outer_product(tasks), REPEAT, 0),
        # ~1 task/s: one run only
        "multiprocessing.Pool": measure(lambda: outer_product.run("multiprocessing", tasks), 1, 0),
    }
    ms_t = m["memshare.Pool"][0]
    rows = [[name, f"{tasks / v[0]:.2f}", spread(v), ratio(ms_t, v[0])] for name, v in m.items()]
    return table(
        f"Workload (a): row outer product, {tasks} tasks (40 MB frame in, 200 MB out), "
        f"{WORKERS} workers",
        ["how", "tasks/s", "time (median [min-max])", "memshare.Pool is faster by"],
        rows,
    )


def bench_convolution(tasks: int = 8) -> str:
    m = {
        "sequential loop": measure(lambda: convolution.run("sequential", tasks), REPEAT, 0),
        "memshare.Pool": measure(lambda: convolution.run("memshare", tasks), REPEAT, 1),
        "multiprocessing.Pool": measure(
            lambda: convolution.run("multiprocessing", tasks), REPEAT, 0
        ),
    }
    ms_t = m["memshare.Pool"][0]
    rows = [[name, f"{tasks / v[0]:.2f}", spread(v), ratio(ms_t, v[0])] for name, v in m.items()]
    return table(
        f"Workload (b): 20x20 convolution of the whole frame, {tasks} tasks, {WORKERS} workers",
        ["how", "tasks/s", "time (median [min-max])", "memshare.Pool is faster by"],
        rows,
    )


def bench_class_attribute(tasks: int = 2000) -> str:
    model = class_attribute.Model()
    m = {
        "sequential loop": measure(lambda: model.run("sequential", tasks), REPEAT, 0),
        "memshare.Pool": measure(lambda: model.run("memshare", tasks), REPEAT, 1),
        "multiprocessing.Pool": measure(lambda: model.run("multiprocessing", tasks), REPEAT, 0),
    }
    ms_t = m["memshare.Pool"][0]
    rows = [[name, spread(v), ratio(ms_t, v[0])] for name, v in m.items()]
    return table(
        f"Workload (c): pool.map(self.method) over a 200 MB attribute, {tasks} tasks "
        "(16 chunks), pool start included",
        ["how", "time (median [min-max])", "memshare.Pool is faster by"],
        rows,
    )


def identity(x):
    return x


def bench_tiny_tasks(n: int = 100_000, chunksize: int = 100) -> str:
    data = list(range(n))
    rows = []
    medians = {}
    for name, cls in [("multiprocessing.Pool", mp.Pool), ("memshare.Pool", ms.Pool)]:
        with cls(WORKERS) as pool:
            pool.map(identity, data, chunksize=chunksize)  # warm up
            med = measure(lambda p=pool: p.map(identity, data, chunksize=chunksize), 7, 0)
        medians[name] = med[0]
        rows.append([name, spread(med), f"{med[0] / n * 1e6:.2f} µs"])
    base = medians["multiprocessing.Pool"]
    for r, name in zip(rows, medians, strict=True):
        r.append(f"{medians[name] / base:.2f}x")
    return table(
        f"Per-task overhead: identity on small ints, {n} tasks, chunksize {chunksize}",
        ["pool", "map time (median [min-max])", "per task", "vs multiprocessing.Pool"],
        rows,
    )


def main() -> None:
    warnings.simplefilter("ignore")
    print(__doc__.split("\n\n")[0].replace("\n", " ") + "\n")
    for bench in (bench_tiny_tasks, bench_convolution, bench_class_attribute, bench_outer_product):
        print(bench(), flush=True)


if __name__ == "__main__":
    main()
