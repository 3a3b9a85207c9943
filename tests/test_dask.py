"""memshare.dask on real Dask clusters (loopback only): zero-copy between the
processes of a host, bytes to a worker with a private /dev/shm, pins across
killed workers and aborted transfers, and memshare.dask.Pool's conformance
with multiprocessing.Pool."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import test_pool as pool_checks  # the ms.Pool conformance task functions
from distributed import Client, LocalCluster

import memshare as ms
import memshare.dask as md
from memshare import _native

T = 60  # seconds: the bound of every blocking call
MB = 1 << 20
N_200MB = 25_000_000  # float64 elements

# --- task functions -------------------------------------------------------------------


def memshare_mapping(arr: np.ndarray) -> str | None:
    """The memshare file mapped at ``arr``'s buffer in this process, per /proc/self/maps."""
    address = arr.__array_interface__["data"][0]
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi:
                path = fields[-1] if len(fields) >= 6 else ""
                return path if "/memshare-" in path else None
    return None


def make_array(n: int, value: float) -> np.ndarray:
    return np.full(n, value)


def probe(arr: np.ndarray) -> tuple[float, float, str | None, int]:
    """What a task sees of its argument: values, where its memory lies, pid."""
    return float(arr[0]), float(arr[-1]), memshare_mapping(arr), os.getpid()


def probe_frame(df) -> tuple[float, str | None]:
    return float(df["a"].sum()), memshare_mapping(df["a"].to_numpy())


def add_one(arr: np.ndarray) -> np.ndarray:
    return arr + 1.0


def born_shared() -> bool:
    return ms.is_shared(np.ones(MB // 4))


def copies_on_the_way() -> int:
    from memshare.dask import _serialize

    return _serialize.counters["shared_on_the_way"]


def worker_pid() -> int:
    return os.getpid()


def worker_data_len(dask_worker) -> int:
    return len(dask_worker.data)


def scheduler_task_count(dask_scheduler) -> int:
    return len(dask_scheduler.tasks)


# --- helpers --------------------------------------------------------------------------


def wait_for(condition, what: str, timeout: float = T) -> None:
    """Polls ``condition`` until it holds (a state the cluster reaches
    asynchronously), failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def reaped_stats() -> dict:
    """The arena's usage after reclaiming what dead processes held."""
    ms.reap()
    return ms.stats()


def drain(client: Client) -> None:
    """Waits until the cluster forgot every key (releases are asynchronous)."""
    gc.collect()
    wait_for(
        lambda: (
            client.run_on_scheduler(scheduler_task_count) == 0
            and not any(client.run(worker_data_len).values())
        ),
        "the cluster to release every key",
    )
    # Freed blocks a worker made itself wait in its cache for reuse (up to a
    # second when idle): give them back now, for the tests' exact counts.
    client.run(_native.flush_block_cache)


def worker_names(dask_scheduler) -> dict[str, str]:
    """Address -> name of every worker, as the scheduler has them now."""
    return {address: str(ws.name) for address, ws in dask_scheduler.workers.items()}


def workers(client: Client) -> list[str]:
    # Not client.scheduler_info(): the client's periodic refresh, which keeps
    # no per-worker information (distributed 2026.8), may overwrite the fresh
    # answer before it is returned, and it comes back with no workers.
    return sorted(client.run_on_scheduler(worker_names))


def wait_for_restart(client: Client, dead: str) -> None:
    """Waits until the nanny replaced worker ``dead``: two workers, neither of
    them ``dead``. One list per poll: two queries could see the old worker
    still there in the first and the dead one gone in the second, before its
    replacement registered."""

    def replaced() -> bool:
        now = workers(client)
        return len(now) == 2 and dead not in now

    wait_for(replaced, "the nanny's restart")


def new_cluster(n: int = 2) -> LocalCluster:
    return LocalCluster(
        n_workers=n,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        worker_dashboard_address=None,
    )


@pytest.fixture(scope="module")
def client():
    """One registered 2-worker cluster for the module; when it closes nothing
    of the cluster's is left in the arena."""
    gc.collect()
    ms.reap()
    before = ms.stats()
    with new_cluster() as cluster, Client(cluster, timeout=T) as c:
        md.register(c)
        yield c
    gc.collect()
    ms.reap()
    after = ms.stats()
    assert after["processes"] == before["processes"]
    assert (after["live_blocks"], after["bytes_in_use"], after["pins"]) == (
        before["live_blocks"],
        before["bytes_in_use"],
        before["pins"],
    )


@pytest.fixture
def c(client):
    """The module's client; each test leaves the cluster holding nothing."""
    yield client
    drain(client)


# --- zero copy on one host ----------------------------------------------------------------


def test_200mb_worker_to_worker_and_to_client_is_the_same_memory(c):
    a, b = workers(c)
    x = c.submit(make_array, N_200MB, 1.5, workers=[a], pure=False)
    first, last, mapping, pid = c.submit(probe, x, workers=[b], pure=False).result(T)
    assert (first, last) == (1.5, 1.5)
    assert mapping is not None, "worker b received a copy, not the shared block"
    assert pid == c.run(worker_pid, workers=[b])[b]
    arr = x.result(T)
    assert arr.shape == (N_200MB,) and arr[0] == 1.5 and arr[-1] == 1.5
    assert memshare_mapping(arr) is not None, "the client received a copy"
    assert ms.is_shared(arr) and not arr.flags.writeable  # a view of the worker's memory
    assert c.run(copies_on_the_way, workers=[a])[a] == 0  # born in shared memory
    del arr, x


def test_tasks_allocate_large_arrays_in_shared_memory(c):
    for w in workers(c):
        assert c.submit(born_shared, workers=[w], pure=False).result(T) is True
    assert not born_shared()  # the client's own arrays stay private


def test_scatter_and_results_of_results_travel_by_handle(c):
    a, b = workers(c)
    data = np.arange(4 * MB // 8, dtype=np.float64)
    [x] = c.scatter([data], workers=[a])
    y = c.submit(add_one, x, workers=[b], pure=False)  # born in shared memory on b
    first, last, mapping, _ = c.submit(probe, y, workers=[a], pure=False).result(T)
    assert (first, last) == (1.0, float(data[-1]) + 1.0)
    assert mapping is not None
    back = y.result(T)
    np.testing.assert_array_equal(back, data + 1.0)
    assert memshare_mapping(back) is not None
    del back, x, y


def test_small_arrays_and_frames(c):
    pd = pytest.importorskip("pandas")
    a, b = workers(c)
    small = c.submit(make_array, 100, 2.0, workers=[a], pure=False)
    assert c.submit(probe, small, workers=[b], pure=False).result(T)[2] is None  # bytes
    df = pd.DataFrame({"a": np.ones(MB // 4), "b": np.arange(MB // 4)})
    [f] = c.scatter([df], workers=[a])
    total, mapping = c.submit(probe_frame, f, workers=[b], pure=False).result(T)
    assert total == MB // 4 and mapping is not None
    back = f.result(T)
    pd.testing.assert_frame_equal(back, df)
    assert memshare_mapping(back["a"].to_numpy()) is not None
    del back, f, small


def test_nested_results_go_by_handle(c):
    a, _ = workers(c)
    fut = c.submit(lambda: {"x": [np.ones(MB // 4), 3], "y": np.zeros(10)}, workers=[a], pure=False)
    got = fut.result(T)
    assert memshare_mapping(got["x"][0]) is not None and got["x"][1] == 3
    assert memshare_mapping(got["y"]) is None  # below the threshold
    del got, fut


def test_executor_is_memshare_aware(c):
    ex = c.get_executor()
    assert isinstance(ex, md.Executor)
    data = np.ones(2 * MB // 8)
    results = list(ex.map(probe, [data, data, data]))
    assert all(r[0] == 1.0 and r[2] is not None for r in results)
    assert ex.submit(pool_checks.add, 2, 3).result(T) == 5
    out = ex.submit(add_one, data).result(T)
    assert memshare_mapping(out) is not None and out[0] == 2.0
    ex.shutdown()
    del out


# --- another host, as far as memory goes ------------------------------------------------


def test_worker_with_a_private_dev_shm_gets_bytes(c):
    scheduler = c.scheduler.address
    assert scheduler.startswith("tcp://127.0.0.1:")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMSHARE_")}
    env["PYTHONPATH"] = str(Path(__file__).parent)  # the task functions' module
    script = (
        'mount -t tmpfs -o size=1g tmpfs /dev/shm && exec "$0" -m distributed.cli.dask_worker '
        '"$1" --no-nanny --nthreads 1 --name private --host 127.0.0.1 --no-dashboard'
    )
    proc = subprocess.Popen(
        ["unshare", "-m", "sh", "-c", script, sys.executable, scheduler],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        c.wait_for_workers(3, timeout=T)
        here = workers(c)
        names = c.run_on_scheduler(worker_names)
        private = next(w for w, name in names.items() if name == "private")
        local = next(w for w in here if w != private)
        identities = c.run(md.memory_identity)
        assert identities[private] != identities[local] == md.memory_identity()

        data = np.arange(2 * MB // 8, dtype=np.float64)
        [x] = c.scatter([data], workers=[private])  # client -> private
        first, last, mapping, _ = c.submit(probe, x, workers=[private], pure=False).result(T)
        assert (first, last) == (0.0, float(data[-1])) and mapping is None
        y = c.submit(add_one, x, workers=[private], pure=False)  # born in the private arena
        back = y.result(T)  # private -> client (the only holder yet)
        np.testing.assert_array_equal(back, data + 1.0)
        assert memshare_mapping(back) is None
        first, last, mapping, _ = c.submit(probe, y, workers=[local], pure=False).result(T)
        assert (first, last) == (1.0, float(data[-1]) + 1.0) and mapping is None  # private -> local
        z = c.submit(make_array, MB // 4, 7.0, workers=[local], pure=False)
        first, _, mapping, _ = c.submit(probe, z, workers=[private], pure=False).result(T)
        assert first == 7.0 and mapping is None  # local -> private
        del x, y, z, back
        drain(c)
        c.retire_workers([private], close_workers=True)
        assert proc.wait(T) is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(T)
        wait_for(lambda: len(workers(c)) == 2, "the private worker to leave")


# --- pins across killed processes and aborted transfers ---------------------------------

_RAW_GET_DATA = textwrap.dedent(
    """
    import asyncio, sys
    from distributed.comm import connect
    from memshare.dask import _wire

    async def main(address, key):
        _wire.enable(1 << 20)  # advertise this host's memory, as a worker does
        comm = await connect(address)
        comm.deserialize = False  # read the reply without opening its handles
        await comm.write({"op": "get_data", "keys": [key], "who": None, "reply": True})
        await comm.read()
        print("received", flush=True)
        sys.stdin.read()  # until killed

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


@pytest.mark.parametrize("victim", ["recipient", "sender"])
def test_killed_during_a_transfer_leaks_nothing(c, victim):
    a, _ = workers(c)
    x = c.submit(make_array, 4 * MB // 8, 3.0, workers=[a], pure=False)
    x.result(T)
    pins_before = ms.stats()["pins"]
    peer = subprocess.Popen(
        [sys.executable, "-c", _RAW_GET_DATA, a, x.key],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = []
        reader = threading.Thread(target=lambda: line.append(peer.stdout.readline()), daemon=True)
        reader.start()
        reader.join(T)
        assert line == ["received\n"]
        # The handle is in flight: pinned for the sender, opened by nobody.
        assert ms.stats()["pins"] == pins_before + 1
        if victim == "recipient":
            peer.kill()
        else:
            os.kill(c.run(worker_pid, workers=[a])[a], signal.SIGKILL)
        wait_for(lambda: reaped_stats()["pins"] == pins_before, "the pin to be released")
    finally:
        if peer.poll() is None:
            peer.kill()
        peer.wait(T)
        peer.stdout.close()
        peer.stdin.close()
    del x
    if victim == "sender":
        wait_for_restart(c, a)


def test_sigkilled_worker_is_reclaimed_and_its_restart_is_memshare_aware(c):
    a, b = workers(c)
    x = c.submit(make_array, N_200MB // 10, 4.0, workers=[a], pure=False)
    x.result(T)
    old_pid = c.run(worker_pid, workers=[a])[a]
    in_use = ms.stats()["bytes_in_use"]
    assert in_use >= 20 * 10**6
    os.kill(old_pid, signal.SIGKILL)
    del x
    wait_for_restart(c, a)
    wait_for(
        lambda: reaped_stats()["bytes_in_use"] <= in_use - 20 * 10**6, "the dead worker's memory"
    )
    # The restarted worker got the plugin again: its results still travel by handle.
    new = next(w for w in workers(c) if w != b)
    y = c.submit(make_array, MB // 4, 5.0, workers=[new], pure=False)
    first, _, mapping, _ = c.submit(probe, y, workers=[b], pure=False).result(T)
    assert first == 5.0 and mapping is not None
    del y


# --- a whole cluster's lifecycle, in its own shm directory ------------------------------

_LIFECYCLE = textwrap.dedent(
    """
    import numpy as np
    from distributed import Client, LocalCluster
    import memshare as ms, memshare.dask as md

    def make():
        return np.full(25_000_000, 2.0)

    def where(arr):
        import os
        address = arr.__array_interface__["data"][0]
        for line in open("/proc/self/maps"):
            fields = line.split()
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            if lo <= address < hi:
                return len(fields) >= 6 and "/memshare-" in fields[-1]
        return False

    if __name__ == "__main__":
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None, worker_dashboard_address=None) as cluster, \\
                Client(cluster) as c:
            a, b = sorted(c.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.workers)))
            for registered in (False, True):
                if registered:
                    md.register(c)
                x = c.submit(make, workers=[a], pure=False)
                remote = c.submit(where, x, workers=[b], pure=False).result(60)
                local = x.result(60)
                print(registered, remote, where(local), float(local.sum()), flush=True)
                del x, local
        print("closed", ms.stats()["live_blocks"], flush=True)
    """
)


def test_without_register_it_is_copied_and_a_closed_cluster_leaves_nothing(tmp_path):
    shm = Path(f"/dev/shm/memshare-dasktest-{os.getpid()}")
    shm.mkdir(mode=0o700)
    try:
        script = tmp_path / "lifecycle.py"
        script.write_text(_LIFECYCLE)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEMSHARE_")}
        env["MEMSHARE_DIR"] = str(shm)
        out = subprocess.run(
            [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=3 * T
        )
        assert out.returncode == 0, out.stderr[-3000:]
        lines = out.stdout.splitlines()
        assert lines == [
            "False False False 50000000.0",  # stock Dask: copies on both hops
            "True True True 50000000.0",  # registered: the same memory
            "closed 0",
        ]
        assert sorted(p.name for p in shm.iterdir()) == []  # nothing left by any process
    finally:
        for p in shm.iterdir():
            p.unlink()
        shm.rmdir()


# --- memshare.dask.Pool: the conformance checks of ms.Pool that apply ---------------------

square, add, fail_on = pool_checks.square, pool_checks.add, pool_checks.fail_on


@pytest.fixture
def pool(c):
    with md.Pool(c) as p:
        yield p


def test_pool_methods_match_stdlib(pool):
    data = list(range(23))
    squares = [x * x for x in data]  # what multiprocessing.Pool returns
    assert pool.map(square, data) == squares
    assert pool.map(square, data, chunksize=5) == squares
    assert list(pool.imap(square, data)) == squares
    assert list(pool.imap(square, iter(data), chunksize=4)) == squares
    assert sorted(pool.imap_unordered(square, data, chunksize=3)) == squares
    pairs = [(i, 2 * i) for i in range(9)]
    assert pool.starmap(add, pairs) == [3 * i for i in range(9)]
    assert pool.starmap_async(add, pairs).get(T) == [3 * i for i in range(9)]
    assert pool.apply(add, (1, 2)) == 3
    assert pool.apply(add, (), {"a": 1, "b": 5}) == 6
    assert pool.apply_async(square, (4,)).get(T) == 16
    assert pool.map_async(square, data, chunksize=7).get(T) == [x * x for x in data]


@pytest.mark.parametrize("chunksize", [None, 1, 2, 7, 100])
def test_pool_chunksize_edges_and_empty_iterables(pool, chunksize):
    for n in (0, 1, 2, 13):
        data = list(range(n))
        assert pool.map(square, data, chunksize=chunksize) == [x * x for x in data]
        if chunksize is not None:
            assert list(pool.imap(square, data, chunksize)) == [x * x for x in data]
            assert sorted(pool.imap_unordered(square, data, chunksize)) == [x * x for x in data]
    assert pool.starmap(add, []) == []
    assert list(pool.imap_unordered(square, iter([]))) == []
    with pytest.raises(ValueError):
        pool.imap(square, [1], chunksize=0)


def test_pool_callbacks_run_with_results_and_errors(pool):
    got, errors = [], []
    done = threading.Event()
    r = pool.map_async(square, range(5), callback=got.append, error_callback=errors.append)
    assert r.get(T) == [0, 1, 4, 9, 16]
    r = pool.apply_async(fail_on, (3,), callback=got.append, error_callback=errors.append)
    with pytest.raises(ValueError, match="bad value 3"):
        r.get(T)
    assert r.ready() and not r.successful()
    r = pool.starmap_async(add, [(1, 2)], callback=lambda v: (got.append(v), done.set()))
    assert r.get(T) == [3]
    assert done.wait(T)
    assert got[0] == [0, 1, 4, 9, 16] and got[-1] == [3]
    assert len(errors) == 1 and isinstance(errors[0], ValueError)


def test_pool_exceptions_and_imap_going_on_after_an_error(pool):
    with pytest.raises(ValueError, match="bad value 3") as info:
        pool.map(fail_on, range(6))
    assert "fail_on" in "".join(__import__("traceback").format_tb(info.value.__traceback__))
    it = pool.imap(fail_on, range(6))
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError):
        next(it)
    assert next(it) == 4  # as in the stdlib, imap goes on after an error
    assert list(it) == [5]
    with pytest.raises(mp.TimeoutError):
        pool.apply_async(time.sleep, (1,)).get(0.01)


def test_pool_close_join_and_state_errors(c):
    pool = md.Pool(c)
    r = pool.map_async(square, range(10))
    pool.close()
    with pytest.raises(ValueError):
        pool.apply(square, (1,))
    pool.join(T)
    assert r.get(0) == [x * x for x in range(10)]
    pool = md.Pool(c)
    with pytest.raises(ValueError):
        pool.join()  # still running
    pool.terminate()
    pool.join(T)
    with pytest.raises(ValueError):
        md.Pool(c, share_threshold=0)


def pair_row_sum(pair):
    frame, i = pair
    return float(frame[i].sum())


def row_outer(frame, i):
    row = frame[i]
    return np.outer(row[:500], np.ones(1000)), float(row.sum())  # 4 MB


def test_pool_frame_generator_scattered_once_results_by_handle(pool, c):
    big = np.random.default_rng(0).random((16, 256_000))  # 32 MB, above the threshold
    scatters = []
    original = c.scatter

    def counting_scatter(*args, **kwargs):
        scatters.append(1)
        return original(*args, **kwargs)

    c.scatter = counting_scatter
    try:
        results = list(pool.imap(pair_row_sum, ((big, i) for i in range(16))))
        outs = pool.starmap(row_outer, [(big, i) for i in range(4)])
    finally:
        del c.scatter
    assert results == [float(big[i].sum()) for i in range(16)]
    assert len(scatters) == 2  # once per call, not per task
    for i, (out, s) in enumerate(outs):
        assert s == float(big[i].sum()) and out.shape == (500, 1000)
        assert memshare_mapping(out) is not None  # born in shared memory, came by handle
    del outs
