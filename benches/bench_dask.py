"""memshare on Dask against stock Dask, same run, same machine.

LocalCluster(n_workers=2, threads_per_worker=1, processes=True) on loopback:
a stock cluster first, then a cluster with ``memshare.dask.register``. Rows:
a 200 MB array made on one worker and used on the other, a 200 MB result
gathered to the client, and the seed workload (a) (row outer product,
examples/outer_product.py) with 16 tasks: stock Dask with the frame scattered
once and ``client.map``, ``memshare.dask.Pool`` running the ``ms.Pool`` code
unchanged, and the sequential loop.
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import outer_product
from _util import REPEAT, measure, spread, table

N = 25_000_000  # float64: 200 MB
TASKS = 16
SLOW_REPEAT = REPEAT


def make_array(n: int) -> np.ndarray:
    return np.full(n, 1.0)


def first(arr: np.ndarray) -> float:
    return float(arr[0])


def total(arr: np.ndarray) -> float:
    return float(arr.sum())


def outer_task(frame, label):
    return outer_product.do_work((frame, label))


def new_cluster():
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        worker_dashboard_address=None,
    )


def _addresses(dask_scheduler) -> list[str]:
    return list(dask_scheduler.workers)


def worker_addresses(client) -> list[str]:
    """The workers' addresses, from the scheduler (client.scheduler_info() may
    come back without them: its periodic refresh keeps none)."""
    return sorted(client.run_on_scheduler(_addresses))


def worker_to_worker(client, use, n: int = N) -> tuple[float, float, float]:
    """A task on worker b uses an array of ``n`` float64 made on worker a
    (made before the clock starts)."""
    a, b = worker_addresses(client)
    state: dict = {}

    def setup():
        state["x"] = client.submit(make_array, n, workers=[a], pure=False)
        state["x"].result()

    def run():
        client.submit(use, state["x"], workers=[b], pure=False).result()

    return _timed(setup, run, state, client)


def gather(client) -> tuple[float, float, float]:
    """The client gathers a 200 MB result (made before the clock starts)."""
    a, _ = worker_addresses(client)
    state: dict = {}

    def setup():
        state["x"] = client.submit(make_array, N, workers=[a], pure=False)
        from distributed import wait

        wait(state["x"])

    def run():
        state["x"].result()

    return _timed(setup, run, state, client)


def _timed(setup, run, state, client) -> tuple[float, float, float]:
    import time

    times = []
    for i in range(REPEAT + 1):
        setup()
        t0 = time.perf_counter()
        run()
        dt = time.perf_counter() - t0
        state.clear()
        gc.collect()
        if i:  # the first is a warm-up
            times.append(dt)
    times.sort()
    return times[len(times) // 2], times[0], times[-1]


def workload_stock(client) -> float:
    frame = outer_product.make_frame()
    labels = [frame.index[i % len(frame)] for i in range(TASKS)]
    [f] = client.scatter([frame], broadcast=True)
    s = 0.0
    for future in client.map(outer_task, [f] * TASKS, labels, pure=False):
        s += future.result().sum()
        future.release()
    return s


def workload_memshare(client) -> float:
    import memshare.dask

    frame = outer_product.make_frame()
    labels = [frame.index[i % len(frame)] for i in range(TASKS)]
    s = 0.0
    with memshare.dask.Pool(client) as pool:  # was: memshare.Pool()
        for result in pool.imap(outer_product.do_work, ((frame, label) for label in labels)):
            s += result.sum()
    return s


def ratio(base: float, other: float) -> str:
    return f"{base / other:.1f}x"


def main() -> None:
    from distributed import Client

    load = os.getloadavg()
    results: dict[str, dict] = {}
    for name in ("stock", "memshare"):
        with new_cluster() as cluster, Client(cluster) as client:
            if name == "memshare":
                import memshare.dask

                memshare.dask.register(client)
            r = results[name] = {}
            r["w2w floor"] = worker_to_worker(client, first, 1)
            r["w2w first"] = worker_to_worker(client, first)
            r["w2w sum"] = worker_to_worker(client, total)
            r["gather"] = gather(client)
            if name == "stock":
                client.direct_to_workers = True
                r["gather direct"] = gather(client)
                client.direct_to_workers = None
                r["workload"] = measure(lambda c=client: workload_stock(c), SLOW_REPEAT, 1)
            else:
                r["workload"] = measure(lambda c=client: workload_memshare(c), SLOW_REPEAT, 1)
    seq = measure(lambda: outer_product.run("sequential", TASKS), SLOW_REPEAT, 0)
    end_load = os.getloadavg()

    st, ms_ = results["stock"], results["memshare"]
    print("## memshare on Dask\n")
    print(
        "LocalCluster(n_workers=2, threads_per_worker=1, processes=True) on loopback; stock "
        "Dask and `memshare.dask.register(client)` in the same run. A transfer row times a "
        "task on worker b that uses an array made on worker a (made before the clock "
        "starts), so it includes Dask's task round trip; a gather row times "
        "`future.result()`. See docs/dask.md.\n"
    )
    # (title, stock row, memshare row): the direct gather has no memshare twin.
    transfers = [
        (
            "8 bytes worker to worker (Dask's task round trip: the floor of the rows below)",
            "w2w floor",
            "w2w floor",
        ),
        ("200 MB worker to worker, task reads one element", "w2w first", "w2w first"),
        ("200 MB worker to worker, task sums it", "w2w sum", "w2w sum"),
        (
            "200 MB gather to the client (stock: through the scheduler, its default)",
            "gather",
            "gather",
        ),
        ("200 MB gather to the client (stock: direct_to_workers=True)", "gather direct", "gather"),
    ]
    rows = [
        [title, spread(st[a]), spread(ms_[b]), ratio(st[a][0], ms_[b][0])]
        for title, a, b in transfers
    ]
    print(
        table(
            f"Dask: 200 MB transfers on one host, 2 workers (median [min-max] of {REPEAT})",
            ["", "stock Dask", "memshare.dask", "memshare faster by"],
            rows,
        )
    )
    wl = [
        ["sequential loop", TASKS / seq[0], spread(seq), "1.00x"],
        [
            "stock Dask: scatter(frame, broadcast=True) + client.map",
            TASKS / st["workload"][0],
            spread(st["workload"]),
            f"{seq[0] / st['workload'][0]:.2f}x",
        ],
        [
            "memshare.dask.Pool(client).imap (the ms.Pool code)",
            TASKS / ms_["workload"][0],
            spread(ms_["workload"]),
            f"{seq[0] / ms_['workload'][0]:.2f}x",
        ],
    ]
    wl = [[r[0], f"{r[1]:.2f}", r[2], r[3]] for r in wl]
    floor = {k: r["w2w floor"][0] for k, r in results.items()}
    moved = {k: r["w2w first"][0] - floor[k] for k, r in results.items()}
    spread_ms = results["memshare"]["w2w floor"][2] - results["memshare"]["w2w floor"][1]
    if moved["memshare"] <= spread_ms:
        theirs = "within the floor's own run-to-run spread (nothing measurable)"
    else:
        less = moved["stock"] / moved["memshare"]
        theirs = f"{moved['memshare'] * 1e3:.1f} ms ({less:.0f}x less)"
    print(
        "Above the floor (the 200 MB row minus the 8-byte row: the transfer itself): "
        f"stock {moved['stock'] * 1e3:.1f} ms, memshare {theirs}.\n"
    )
    print(
        table(
            f"Dask: workload (a), row outer product, {TASKS} tasks on 2 workers "
            f"(40 MB frame in, 200 MB out per task; median [min-max] of {SLOW_REPEAT})",
            ["", "tasks/s", "time", "vs loop"],
            wl,
        )
    )
    print(
        f"memshare.dask.Pool vs stock Dask: {st['workload'][0] / ms_['workload'][0]:.1f}x. "
        f"Load average (1 min) {load[0]:.1f} at the start, {end_load[0]:.1f} at the end "
        "(the machine is shared).\n"
    )


if __name__ == "__main__":
    main()
