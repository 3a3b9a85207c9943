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
import time
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
from _util import REPEAT, conditions, measure_interleaved, spread, summary, table, thp_setting

import memshare as ms

WORKERS = 2
HALVES = "2 independent processes, half the loop each (nothing shared or sent)"
WARM = "memshare.Pool, warm (started, and one call made, before the clock)"


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


# --- two halves of the loop in two processes, for workload (a) -----------------------------


def _half_of_the_loop(tasks: int, out) -> None:
    out.put(outer_product.run("sequential", tasks))


def two_independent_loops(tasks: int) -> float:
    """What two cores do with the loop's own code: two processes each run
    half the tasks as the sequential loop does (own frame, own sums) and
    share or send nothing. Not a hard ceiling: the loop's numpy writes each
    200 MB result into fresh memory the kernel must zero and map, while
    memshare's workers reuse blocks whose pages they map already."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    halves = [
        ctx.Process(target=_half_of_the_loop, args=(n, out))
        for n in (tasks // 2, tasks - tasks // 2)
    ]
    for p in halves:
        p.start()
    total = sum(out.get(timeout=600) for _ in halves)
    for p in halves:
        p.join(60)
    return total


# --- how far the cores scale on this machine, for workload (a)'s floor -------------------


def _python_spin(_=None) -> None:
    x = 0
    for i in range(5_000_000):
        x += i * i


def _numpy_in_cache(_=None) -> None:
    a = np.random.default_rng(0).random((256, 256))  # 512 KiB: stays in cache
    for _ in range(1000):
        a = np.sin(a)


def _fresh_private_arrays(_=None) -> None:
    for _ in range(8):
        a = np.empty(25_000_000)  # 200 MB, a fresh mapping each time
        a[:] = 1.0
        del a


def bench_core_scaling() -> str:
    """The same work in 1 process and in 2 at once (fork, nothing shared): how
    much of 2x this machine's 2 cores give before memshare does anything.
    Workload (a)'s own loop split in two is the last row of bench_outer_product."""
    ctx = mp.get_context("fork")
    rows = []
    with ctx.Pool(1) as one, ctx.Pool(WORKERS) as two:
        for name, work in (
            ("pure-Python integer loop", _python_spin),
            ("numpy sin on a 512 KiB array (in cache)", _numpy_in_cache),
            ("fresh private 200 MB arrays filled", _fresh_private_arrays),
        ):
            m = measure_interleaved(
                {
                    "1": lambda w=work: one.map(w, [None], chunksize=1),
                    "2": lambda w=work: two.map(w, [None] * WORKERS, chunksize=1),
                }
            )
            done = WORKERS * m["1"][0] / m["2"][0]
            rows.append([name, spread(m["1"]), spread(m["2"]), f"{done:.2f}x"])
    return table(
        f"How far {WORKERS} cores scale here: the same work in 1 process, then in {WORKERS} "
        f"at once sharing nothing (median [min-max] of {REPEAT}, interleaved)",
        ["work", "1 process", f"{WORKERS} processes at once", "work done vs 1 process"],
        rows,
    ) + (
        f"\nWorkload (a)'s goal of 2.0x the loop needs {WORKERS} cores that run its work side "
        "by side at full speed, and a pool that spends no more CPU than the loop. Its work "
        "is mostly fresh memory the kernel zeroes and maps (the last row), which scales "
        "less than computing does. The loop's own work split in two, with nothing shared "
        "or sent, is the last row of the workload (a) table.\n"
    )


# --- tables ---------------------------------------------------------------------------


def memshare_warm(pool, tasks: int) -> float:
    """``outer_product.run("memshare", tasks)`` on a pool that is already
    running (as in a notebook or a service that keeps its pool): the same
    frame made, shared and sent, the same results summed."""
    frame = outer_product.make_frame()
    labels = [frame.index[i % len(frame)] for i in range(tasks)]
    total = 0.0
    for result in pool.imap(outer_product.do_work, ((frame, label) for label in labels)):
        total += result.sum()
    return total


def ratio(a: float, b: float) -> str:
    return f"{b / a:.2f}x"


def bench_outer_product(tasks: int = 24) -> str:
    # Interleaved runs (loop, memshare, threads, recipe, mp.Pool, loop, ...):
    # a change in the machine's load hits every way alike.
    with ms.Pool(WORKERS) as warm:
        memshare_warm(warm, tasks)
        m = measure_interleaved(
            {
                "sequential loop": lambda: outer_product.run("sequential", tasks),
                "memshare.Pool": lambda: outer_product.run("memshare", tasks),
                WARM: lambda: memshare_warm(warm, tasks),
                "thread pool (multiprocessing.pool.ThreadPool)": lambda: outer_product.run(
                    "threads", tasks
                ),
                "shared_memory recipe": lambda: recipe_outer_product(tasks),
                "multiprocessing.Pool": lambda: outer_product.run("multiprocessing", tasks),
                HALVES: lambda: two_independent_loops(tasks),
            },
            REPEAT,
            warmup=0,
        )
    ms_t = m["memshare.Pool"][0]
    rows = [
        [
            name,
            f"{tasks / v[0]:.2f}",
            spread(v),
            ratio(ms_t, v[0]),
            ratio(v[0], m["sequential loop"][0]),
        ]
        for name, v in m.items()
    ]
    halves = m[HALVES][0]
    return table(
        f"Workload (a): row outer product, {tasks} tasks (40 MB frame in, 200 MB out), "
        f"{WORKERS} workers, every way sums each result "
        f"(median [min-max] of {REPEAT}, interleaved)",
        ["how", "tasks/s", "time", "memshare.Pool is faster by", "vs the loop"],
        rows,
    ) + (
        f"\nThe memshare.Pool row starts its pool inside the timed run, as the "
        "example does; the warm row times a pool started (and its first call made) "
        "before the clock. Both make, share and send the frame anew in every run. "
        f"The last row is what {WORKERS} cores do with the loop's own code: "
        f"{m['sequential loop'][0] / halves:.2f}x the loop with nothing shared or sent. "
        "It is not a ceiling: each of its results is fresh memory the kernel zeroes and "
        "maps, where memshare's workers reuse blocks whose pages they map already. "
        f"memshare.Pool reaches {halves / ms_t:.0%} of it, warm {halves / m[WARM][0]:.0%}.\n"
    )


# --- what a 200 MB result costs on each kind of page ------------------------------------


def bench_result_pages(repeat: int = REPEAT) -> str:
    """One result of workload (a), ``np.outer`` of two 5000-vectors (200 MB),
    made in fresh private memory (the loop's case: numpy gives each array of
    this size back to the OS when it is freed), in fresh shared memory (a
    new arena segment: every result before it is still held), in a recycled
    shared block, and then summed, as the parent of workload (a) does."""
    rng = np.random.default_rng(0)
    a, b = rng.random(5000), rng.random(5000)
    times: dict[str, list[float]] = {k: [] for k in ("private", "fresh", "recycled")}
    sums: dict[str, list[float]] = {"private": [], "shared": []}
    held = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        private_result = np.outer(a, b)
        times["private"].append(time.perf_counter() - t0)
        with ms.allocate_in_shared_memory():
            t0 = time.perf_counter()
            held.append(np.outer(a, b))  # every block before it is held: a new segment
            times["fresh"].append(time.perf_counter() - t0)
        assert ms.is_shared(held[-1]) and not ms.is_shared(private_result)
        for name, arr in (("private", private_result), ("shared", held[-1])):
            arr.sum()  # the second pass is timed: what the cache kept of the writes is gone
            t0 = time.perf_counter()
            arr.sum()
            sums[name].append(time.perf_counter() - t0)
        del private_result
    del held[:]  # free blocks this process allocated last: the recycled case
    for _ in range(repeat):
        with ms.allocate_in_shared_memory():
            t0 = time.perf_counter()
            r = np.outer(a, b)
            times["recycled"].append(time.perf_counter() - t0)
        del r
    made = {k: summary(v) for k, v in times.items()}
    summed = {k: summary(v) for k, v in sums.items()}
    rows = [
        [
            "private numpy array (transparent huge pages)",
            spread(made["private"]),
            "n/a",
            spread(summed["private"]),
            "1.00x",
        ],
        [
            "memshare block (4 KiB pages)",
            spread(made["fresh"]),
            spread(made["recycled"]),
            spread(summed["shared"]),
            f"{summed['shared'][0] / summed['private'][0]:.2f}x",
        ],
    ]
    return table(
        f"One 200 MB result of workload (a) by kind of page: np.outer made into fresh and "
        f"recycled memory, then summed (median [min-max] of {repeat}). Transparent huge "
        f"pages: {thp_setting('enabled')} (numpy asks for them), shmem_enabled: "
        f"{thp_setting('shmem_enabled')}",
        ["memory", "made fresh", "made recycled", "summed", "sum vs private"],
        rows,
    ) + (
        "\nThe loop of workload (a) makes every result in fresh private memory; "
        "memshare's workers make theirs in fresh shared memory until blocks recycle, "
        "then in recycled blocks, and the parent sums each one. The sum is slower on "
        "4 KiB pages (a TLB miss every 4 KiB instead of every 2 MiB). Where shared "
        "memory gets huge pages (`shmem_enabled`, or `MEMSHARE_DIR` on a tmpfs mounted "
        "`huge=`), reading it is as fast as reading private memory: see the huge-page "
        "row of the first-read table (bench_array).\n"
    )


# --- arena-lock acquisitions per task of workload (a) ----------------------------------

_BARRIER = None


def _keep_barrier(barrier) -> None:
    global _BARRIER
    _BARRIER = barrier


def _worker_locks(_):
    # Both workers wait here together, so each reports exactly once.
    _BARRIER.wait(600)
    return os.getpid(), ms.stats()["lock_acquisitions"]


def _call_locks(pool, frame, tasks: int) -> tuple[int, int]:
    """Arena-lock acquisitions of the parent and of all workers during one
    imap call of ``tasks`` tasks of workload (a)."""
    labels = [frame.index[i % len(frame)] for i in range(tasks)]
    before = dict(pool.map(_worker_locks, range(WORKERS), chunksize=1))
    parent0 = ms.stats()["lock_acquisitions"]
    total = 0.0
    for r in pool.imap(outer_product.do_work, ((frame, label) for label in labels)):
        total += r.sum()
    del r
    parent1 = ms.stats()["lock_acquisitions"]
    after = dict(pool.map(_worker_locks, range(WORKERS), chunksize=1))
    return parent1 - parent0, sum(after[pid] - before[pid] for pid in after)


def bench_lock_traffic(tasks: int = 24) -> str:
    ctx = mp.get_context()
    frame = outer_product.make_frame()
    barrier = ctx.Barrier(WORKERS)
    with ms.Pool(WORKERS, initializer=_keep_barrier, initargs=(barrier,)) as pool:
        _call_locks(pool, frame, 2)  # warm: segments mapped, workers started
        parent, workers = _call_locks(pool, frame, tasks)
        parent2, workers2 = _call_locks(pool, frame, 2 * tasks)
    extra_p, extra_w = parent2 - parent, workers2 - workers
    rows = [
        ["parent (sends tasks, receives and frees results)", parent, f"{parent / tasks:.1f}"],
        [f"{WORKERS} workers (allocate results, send them)", workers, f"{workers / tasks:.1f}"],
        ["all processes", parent + workers, f"{(parent + workers) / tasks:.1f}"],
        [
            f"each further task (a {2 * tasks}-task call less a {tasks}-task one): "
            "parent + workers",
            f"{extra_p} + {extra_w}",
            f"{(extra_p + extra_w) / tasks:.1f}",
        ],
    ]
    return table(
        f"Arena-lock acquisitions, workload (a) with memshare.Pool, one call of {tasks} "
        "tasks (ms.stats()['lock_acquisitions'] of each process; goal: at most 4 per task)",
        ["who", "acquisitions", "per task"],
        rows,
    )


def bench_convolution(tasks: int = 8) -> str:
    m = measure_interleaved(
        {
            "sequential loop": lambda: convolution.run("sequential", tasks),
            "memshare.Pool": lambda: convolution.run("memshare", tasks),
            "multiprocessing.Pool": lambda: convolution.run("multiprocessing", tasks),
        },
        REPEAT,
        warmup=0,
    )
    ms_t = m["memshare.Pool"][0]
    rows = [[name, f"{tasks / v[0]:.2f}", spread(v), ratio(ms_t, v[0])] for name, v in m.items()]
    return table(
        f"Workload (b): 20x20 convolution of the whole frame, {tasks} tasks, {WORKERS} workers",
        ["how", "tasks/s", "time (median [min-max])", "memshare.Pool is faster by"],
        rows,
    )


def bench_class_attribute(tasks: int = 2000) -> str:
    model = class_attribute.Model()
    m = measure_interleaved(
        {
            "sequential loop": lambda: model.run("sequential", tasks),
            "memshare.Pool": lambda: model.run("memshare", tasks),
            "multiprocessing.Pool": lambda: model.run("multiprocessing", tasks),
        },
        REPEAT,
        warmup=0,
    )
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
    # Both pools stay open (an idle pool takes no CPU) and their runs alternate.
    with mp.Pool(WORKERS) as mp_pool, ms.Pool(WORKERS) as ms_pool:
        pools = {"multiprocessing.Pool": mp_pool, "memshare.Pool": ms_pool}
        m = measure_interleaved(
            {
                name: (lambda p=pool: p.map(identity, data, chunksize=chunksize))
                for name, pool in pools.items()
            },
            max(REPEAT, 9),
            warmup=1,
        )
    for name, med in m.items():
        medians[name] = med[0]
        rows.append([name, spread(med), f"{med[0] / n * 1e6:.2f} µs"])
    base = medians["multiprocessing.Pool"]
    for r, name in zip(rows, medians, strict=True):
        r.append(f"{medians[name] / base:.2f}x")
    return table(
        f"Per-task overhead: identity on small ints, {n} tasks, chunksize {chunksize} "
        "(interleaved runs)",
        ["pool", "map time (median [min-max])", "per task", "vs multiprocessing.Pool"],
        rows,
    )


def main() -> None:
    warnings.simplefilter("ignore")
    print(__doc__.split("\n\n")[0].replace("\n", " ") + "\n")
    print(f"_{conditions()}_\n")
    for bench in (
        bench_tiny_tasks,
        bench_outer_product,
        bench_core_scaling,
        bench_result_pages,
        bench_lock_traffic,
        bench_convolution,
        bench_class_attribute,
    ):
        print(bench(), flush=True)


if __name__ == "__main__":
    main()
