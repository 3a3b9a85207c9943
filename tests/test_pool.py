"""memshare.Pool / ProcessPoolExecutor: stdlib conformance, zero-copy, dedup,
failures (killed workers, KeyboardInterrupt) and the numpy allocator hook."""

from __future__ import annotations

import concurrent.futures
import gc
import multiprocessing as mp
import multiprocessing.pool
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import memshare as ms
from memshare import _native, _pool
from memshare._allocator import allocate_in_shared_memory, shared_allocation_threshold
from memshare._pool import Pool, ProcessPoolExecutor, WorkerLostError

T = 60  # seconds: the bound of every blocking call


# --- task functions (module level: picklable under spawn/forkserver) --------------


def square(x):
    return x * x


def add(a, b):
    return a + b


def fail_on(x, bad=3):
    if x == bad:
        raise ValueError(f"bad value {x}")
    return x


def identity(x):
    return x


def big_result(n):
    return np.full((n, 1000), n, dtype=np.float64)


def _zero_copy(arr) -> bool:
    """In shared memory, or a copy-on-write view of it (a private copy that
    copies only the pages written)."""
    base = arr
    while base is not None and not isinstance(base, _native.PrivateView):
        base = getattr(base, "base", None)
    return ms.is_shared(arr) or base is not None


def describe(arr, i):
    return float(arr[i].sum()), _zero_copy(arr), arr.flags.writeable


def scribble(arr, i):
    """Writes into its argument, as naive code does; returns what it saw first."""
    seen = float(arr[i])
    arr[:] = -1.0
    return seen, float(arr.sum())


def describe_pair(pair):
    return describe(*pair)


def make_arrays(n):
    big = np.ones((512, 1024))  # 4 MiB: born in shared memory
    small = np.ones(100)
    return big, small, ms.is_shared(big), ms.is_shared(small), shared_allocation_threshold()


def kill_self_on(x, victim):
    if x == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def hold_then_die(arr):
    np.ones((512, 1024))  # some hook memory the dead worker holds
    os.kill(os.getpid(), signal.SIGKILL)


def interrupt_parent(pid):
    os.kill(pid, signal.SIGINT)
    return 1


def pid_of(_):
    return os.getpid()


def frame_row_sum(frame, label):
    return float(frame.loc[label].sum())


class Holder:
    def __init__(self, n):
        self.data = np.arange(n, dtype=np.float64)

    def part(self, i):
        return float(self.data[i])


_init_value = None


def _set_init(v):
    global _init_value
    _init_value = v


def get_init(_):
    return _init_value


# --- API conformance against the stdlib ----------------------------------------------------


def test_pool_methods_match_stdlib(ctx):
    data = list(range(23))
    with mp.pool.Pool(2, context=ctx) as ref, Pool(2, context=ctx) as pool:
        for p in (ref, pool):
            assert isinstance(p, mp.pool.Pool)
        assert pool.map(square, data) == ref.map(square, data)
        assert pool.map(square, data, chunksize=5) == ref.map(square, data, chunksize=5)
        assert list(pool.imap(square, data)) == list(ref.imap(square, data))
        assert list(pool.imap(square, iter(data), chunksize=4)) == list(
            ref.imap(square, iter(data), chunksize=4)
        )
        assert sorted(pool.imap_unordered(square, data, chunksize=3)) == sorted(
            ref.imap_unordered(square, data, chunksize=3)
        )
        pairs = [(i, 2 * i) for i in range(9)]
        assert pool.starmap(add, pairs) == ref.starmap(add, pairs)
        assert pool.starmap_async(add, pairs).get(T) == ref.starmap_async(add, pairs).get(T)
        assert pool.apply(add, (1, 2)) == 3
        assert pool.apply(add, (), {"a": 1, "b": 5}) == 6
        assert pool.apply_async(square, (4,)).get(T) == 16
        assert pool.map_async(square, data, chunksize=7).get(T) == [x * x for x in data]


@pytest.mark.parametrize("chunksize", [None, 1, 2, 7, 100])
def test_chunksize_edges(chunksize):
    with Pool(2) as pool:
        for n in (0, 1, 2, 13):
            data = list(range(n))
            assert pool.map(square, data, chunksize=chunksize) == [x * x for x in data]
            if chunksize is not None:
                assert list(pool.imap(square, data, chunksize)) == [x * x for x in data]
                assert sorted(pool.imap_unordered(square, data, chunksize)) == [x * x for x in data]


def test_empty_iterables():
    with Pool(2) as pool:
        assert pool.map(square, []) == []
        assert pool.starmap(add, []) == []
        assert list(pool.imap(square, [])) == []
        assert list(pool.imap_unordered(square, iter([]))) == []
        assert pool.map_async(square, []).get(T) == []
    with ProcessPoolExecutor(2) as ex:
        assert list(ex.map(square, [])) == []


def test_bad_chunksize_and_arguments():
    with Pool(1) as pool:
        with pytest.raises(ValueError):
            pool.imap(square, [1], chunksize=0)
    with pytest.raises(TypeError):
        Pool(1, initializer=3)
    with pytest.raises(ValueError):
        Pool(0)
    with pytest.raises(ValueError):
        Pool(1, share_threshold=0)


def test_callbacks_run_with_results_and_errors():
    got, errors = [], []
    done = threading.Event()
    with Pool(2) as pool:
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


def test_exceptions_carry_the_worker_traceback():
    with Pool(2) as pool:
        with pytest.raises(ValueError, match="bad value 3") as info:
            pool.map(fail_on, range(6))
        assert isinstance(info.value.__cause__, mp.pool.RemoteTraceback)
        assert "fail_on" in str(info.value.__cause__)
        it = pool.imap(fail_on, range(6))
        assert [next(it) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(ValueError):
            next(it)
        assert next(it) == 4  # as in the stdlib, imap goes on after an error


def test_unpicklable_result_fails_that_call_only():
    with Pool(1) as pool:
        with pytest.raises(mp.pool.MaybeEncodingError):
            pool.apply(threading.Lock)
        assert pool.apply(square, (3,)) == 9


def test_initializer_and_maxtasksperchild():
    with Pool(2, initializer=_set_init, initargs=(42,), maxtasksperchild=2) as pool:
        assert pool.map(get_init, range(6), chunksize=1) == [42] * 6
        pids = set(pool.map(pid_of, range(8), chunksize=1))
        assert len(pids) >= 3  # workers were replaced


def test_the_worker_handler_sleeps_while_a_result_waits_unread():
    # The stdlib's worker handler also waits on the results pipe, so it spins
    # (and takes the GIL from the caller) for as long as a result waits there.
    entered, release = threading.Event(), threading.Event()

    def hold_the_result_handler(_):
        entered.set()
        release.wait(T)

    with Pool(1) as pool:
        first = pool.apply_async(abs, (-1,), callback=hold_the_result_handler)
        assert entered.wait(T)
        second = pool.apply_async(abs, (-2,))
        try:
            # The second result is in the pipe, and nobody reads it.
            assert _pool._stdlib.result_reader(pool).poll(T)
            clock = time.pthread_getcpuclockid(pool._worker_handler.ident)
            spent = time.clock_gettime(clock)
            time.sleep(1.0)  # a window to watch it in, not a synchronisation
            spent = time.clock_gettime(clock) - spent
        finally:
            release.set()
        assert first.get(T) == 1 and second.get(T) == 2
    assert spent < 0.1, f"the worker handler ran {spent:.3f} s in 1 s of waiting"


def test_close_join_and_state_errors():
    pool = Pool(2)
    r = pool.map_async(square, range(10))
    pool.close()
    with pytest.raises(ValueError):
        pool.apply(square, (1,))
    pool.join()
    assert r.get(0) == [x * x for x in range(10)]
    pool = Pool(1)
    with pytest.raises(ValueError):
        pool.join()  # still running
    pool.terminate()
    pool.join()


def test_progress_bar_object_counts_tasks():
    class Bar:
        def __init__(self):
            self.n = 0

        def update(self, k=1):
            self.n += k

    bar = Bar()
    with Pool(2, progress=bar) as pool:
        pool.map(square, range(10), chunksize=3)
        list(pool.imap(square, range(5)))
        list(pool.imap_unordered(square, range(7), chunksize=2))
    assert bar.n == 22


def test_progress_true_uses_tqdm_or_text(capsys):
    with Pool(2, progress=True) as pool:
        assert pool.map(square, range(4)) == [0, 1, 4, 9]
    assert "4/4" in capsys.readouterr().err


def test_executor_matches_stdlib(ctx):
    with (
        concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as ref,
        ProcessPoolExecutor(2, mp_context=ctx) as ex,
    ):
        assert ex.submit(add, 2, b=3).result(T) == 5
        for cs in (1, 3, 50):
            assert list(ex.map(add, range(10), range(10), chunksize=cs)) == list(
                ref.map(add, range(10), range(10), chunksize=cs)
            )
        f = ex.submit(fail_on, 3)
        with pytest.raises(ValueError, match="bad value 3"):
            f.result(T)
        assert "fail_on" in str(f.exception().__cause__)
        with pytest.raises(ValueError):
            list(ex.map(fail_on, range(5), timeout=T))
        with pytest.raises(ValueError):
            ex.map(square, [1], chunksize=0)
    with pytest.raises(RuntimeError):
        ex.submit(square, 1)


def test_executor_shutdown_cancel_futures():
    ex = ProcessPoolExecutor(1)
    fs = [ex.submit(square, i) for i in range(50)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert all(f.done() for f in fs)
    assert all(f.result(0) == i * i for i, f in enumerate(fs) if not f.cancelled())


# --- sharing: zero-copy, dedup, private copies ---------------------------------------


def test_large_arguments_shared_once_per_call(ctx):
    arr = np.arange(300_000, dtype=np.float64)  # 2.4 MB: above the threshold
    before = _pool.counters["shared_arguments"]
    with Pool(2, context=ctx) as pool:
        out = list(pool.imap(describe_pair, ((arr, i) for i in range(20))))
        assert out == [(float(arr[i]), True, True) for i in range(20)]
        assert _pool.counters["shared_arguments"] == before + 1
        out = pool.starmap(describe, [(arr, i) for i in range(20)], chunksize=3)
        assert _pool.counters["shared_arguments"] == before + 2
        assert out[5] == (5.0, True, True)
    assert not ms.is_shared(arr)  # the caller's array is untouched


def first_item(arr, i):
    return float(arr[0]) + i


def test_an_argument_every_task_receives_is_pinned_once_per_call(ctx):
    """The second task that sends an array switches to one message whose pin
    the call's lease keeps: 200 tasks cost the parent a handful of arena
    transactions, not one pin each, and nothing stays pinned after the call."""
    with Pool(2, context=ctx) as pool:
        # Made after the workers started (a forked worker would hold its own
        # copy of every reference its parent had).
        arr = ms.zeros(300_000)
        arr[0] = 7.0
        base = ms.stats()
        locks0 = ms.stats()["lock_acquisitions"]
        out = pool.starmap(first_item, [(arr, i) for i in range(200)], chunksize=1)
        locks = ms.stats()["lock_acquisitions"] - locks0
        assert out == [7.0 + i for i in range(200)]
        assert locks < 20, f"{locks} arena transactions for 200 tasks of one argument"
        assert ms.stats()["pins"] == base["pins"]
        # Workers let go of the call's argument before they wait for work:
        # once the caller drops it, it is freed while the pool idles.
        del arr
        deadline = time.monotonic() + T
        while ms.stats()["live_blocks"] > base["live_blocks"] - 1:
            assert time.monotonic() < deadline, "an idle worker still holds the call's argument"
            time.sleep(0.01)


def test_a_frame_the_call_copies_is_pinned_once_per_array_from_its_first_task():
    """The call holds the shared copy of a private frame until it ends, so the
    copy's first message already has a kept pin: the second task's message
    pins nothing more, and a worker opens each array once per call."""
    import pickle

    pd = pytest.importorskip("pandas")
    from memshare._pool._arguments import _CallState

    frame = pd.DataFrame(np.arange(400_000, dtype=np.float64).reshape(-1, 4))
    state = _CallState(threshold=1 << 20)
    base = ms.stats()["pins"]
    first = state.dumps((frame, 1))
    pins = ms.stats()["pins"] - base
    second = state.dumps((frame, 2))
    assert pins >= 1 and ms.stats()["pins"] - base == pins, "the second task pinned again"
    for message, label in ((first, 1), (second, 2)):
        back, got = pickle.loads(message)
        assert got == label and back.equals(frame)
        del back
    assert ms.stats()["pins"] - base == pins, "opening a kept pin leaves it in place"
    del state, first, second
    gc.collect()
    assert ms.stats()["pins"] == base, "the call's end takes its pins"


def test_writes_to_arguments_stay_private(ctx):
    """Like arguments pickled by value: a task writing into its argument
    changes neither the caller's array nor what other tasks see."""
    arr = np.arange(300_000, dtype=np.float64)
    with Pool(2, context=ctx) as pool:
        out = pool.starmap(scribble, [(arr, i) for i in range(8)], chunksize=1)
    assert [o[0] for o in out] == [float(i) for i in range(8)]
    assert all(o[1] == -300_000.0 for o in out)
    assert arr[5] == 5.0 and arr.sum() == float(sum(range(300_000)))


def test_small_arguments_travel_by_value():
    arr = np.arange(10.0)
    before = _pool.counters["shared_arguments"]
    with Pool(1) as pool:
        assert pool.apply(describe, (arr, 3)) == (3.0, False, True)
    assert _pool.counters["shared_arguments"] == before


def test_already_shared_arguments_go_by_handle_writable():
    arr = ms.zeros(300_000)
    before = _pool.counters["shared_arguments"]
    with Pool(1) as pool:
        assert pool.apply(describe, (arr, 0)) == (0.0, True, True)
    assert _pool.counters["shared_arguments"] == before


def test_share_threshold_none_disables_sharing():
    arr = np.arange(300_000, dtype=np.float64)
    before = _pool.counters["shared_arguments"]
    with Pool(1, share_threshold=None) as pool:
        assert pool.apply(describe, (arr, 2)) == (2.0, False, True)
        big = pool.apply(make_arrays, (0,))
        assert big[2] is False and big[4] is None
    assert _pool.counters["shared_arguments"] == before


def test_bound_method_attribute_shared_once():
    h = Holder(300_000)
    before = _pool.counters["shared_arguments"]
    with Pool(2) as pool:
        assert pool.map(h.part, range(50), chunksize=5) == [float(i) for i in range(50)]
    assert _pool.counters["shared_arguments"] == before + 1


def test_results_come_back_zero_copy(ctx):
    with Pool(2, context=ctx) as pool:
        results = pool.map(big_result, [300, 400, 500])
        for n, r in zip([300, 400, 500], results, strict=True):
            assert ms.is_shared(r) and r.flags.writeable
            assert r.shape == (n, 1000) and r[0, 0] == n
        r = results[0]
        r[0, 0] = -1  # the parent owns it now
        assert r[0, 0] == -1
        del results, r
    with ProcessPoolExecutor(2, mp_context=ctx) as ex:
        r = ex.submit(big_result, 300).result(T)
        assert ms.is_shared(r) and r[1, 1] == 300
        del r


def test_frames_shared_once():
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame(
        np.random.default_rng(0).random((300, 500)),
        index=[f"row{i}" for i in range(300)],
    )
    before = _pool.counters["shared_arguments"]
    with Pool(2) as pool:
        got = pool.starmap(frame_row_sum, ((frame, f"row{i}") for i in range(10)))
    assert got == pytest.approx([frame.loc[f"row{i}"].sum() for i in range(10)])
    assert _pool.counters["shared_arguments"] == before + 1


# --- the allocator hook ------------------------------------------------------------------


def test_workers_allocate_large_arrays_in_shared_memory(ctx):
    with Pool(1, context=ctx) as pool:
        big, small, big_shared, small_shared, threshold = pool.apply(make_arrays, (0,))
    assert big_shared and not small_shared and threshold == 1 << 20
    assert ms.is_shared(big) and not ms.is_shared(small)
    assert big.sum() == 512 * 1024


def test_hook_is_off_by_default_and_context_local():
    assert shared_allocation_threshold() is None
    assert not ms.is_shared(np.ones((512, 1024)))
    seen = []
    with allocate_in_shared_memory(threshold=4096):
        assert shared_allocation_threshold() == 4096
        a = np.ones(1024)  # 8 KB
        b = np.ones(10)
        t = threading.Thread(target=lambda: seen.append(shared_allocation_threshold()))
        t.start()
        t.join(T)
    assert seen == [None]  # a new thread starts with numpy's default
    assert shared_allocation_threshold() is None
    assert ms.is_shared(a) and not ms.is_shared(b)
    c = a * 2  # made outside: private
    assert not ms.is_shared(c)


def test_hook_frees_return_to_the_arena():
    base = ms.stats()["bytes_in_use"]
    stats0 = _native.numpy_allocator_stats()
    with allocate_in_shared_memory():
        for _ in range(20):
            a = np.zeros((512, 512))  # 2 MiB, calloc path
            assert a.sum() == 0
            a = np.resize(a, (1024, 512))  # realloc-like growth, new arrays
            del a
        a = np.empty((256, 1024))
    assert ms.stats()["bytes_in_use"] >= base + a.nbytes
    del a
    stats1 = _native.numpy_allocator_stats()
    assert stats1["arena_allocations"] > stats0["arena_allocations"]
    assert stats1["live_blocks"] == stats0["live_blocks"]
    assert ms.stats()["bytes_in_use"] == base


def test_hook_arrays_pickle_by_handle():
    import pickle
    from multiprocessing.reduction import ForkingPickler

    with allocate_in_shared_memory():
        a = np.arange(200_000, dtype=np.float64)
    data = bytes(ForkingPickler.dumps(a))
    assert len(data) < 1000
    b = pickle.loads(data)
    assert ms.is_shared(b) and b[123] == 123.0


def test_bad_threshold():
    with pytest.raises(ValueError), allocate_in_shared_memory(threshold=0):
        pass


# --- failures ------------------------------------------------------------------------------


def test_killed_worker_fails_pending_calls_promptly(ctx):
    arr = np.ones((512, 1024))  # shared for the call: its pins must not leak
    with Pool(2, context=ctx) as pool:
        other = pool.apply_async(describe, (arr, 0))
        r = pool.starmap_async(kill_self_on, [(i, 5) for i in range(20)], chunksize=1)
        with pytest.raises(WorkerLostError, match="SIGKILL"):
            r.get(T)
        assert other.wait(T) is None and other.ready()
        with pytest.raises(WorkerLostError):
            pool.map(square, [1])  # the pool is broken


def kill_after(x):
    if x == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def test_killed_worker_imap_raises(ctx):
    with Pool(2, context=ctx) as pool:
        it = pool.imap(kill_after, range(10))
        with pytest.raises(WorkerLostError):
            for _ in range(10):
                it.next(timeout=T)


def test_killed_worker_memory_is_reclaimed():
    arr = np.ones((512, 1024))
    with Pool(1) as pool:
        with pytest.raises(WorkerLostError):
            pool.apply(hold_then_die, (arr,))
    # the autouse fixture checks that nothing (pins, blocks) is left


def _die_holding_the_results_lock():
    # The stdlib's worker loop holds the results queue as a local.
    frame = sys._getframe()
    while frame is not None and "outqueue" not in frame.f_locals:
        frame = frame.f_back
    frame.f_locals["outqueue"]._wlock.acquire()  # as while sending a result
    os.kill(os.getpid(), signal.SIGKILL)


def test_terminate_frees_the_results_lock_a_worker_died_holding():
    """A worker killed just after it sent a result still holds the results
    queue's write lock. If the pool has not noticed the death when terminate
    starts (here: it is told that it is terminating before the death, as
    terminate tells it first), the stdlib's terminate waited for that lock
    forever; memshare's stops the workers first and frees it."""
    pool = Pool(1, context=mp.get_context("fork"))
    lock = pool._outqueue._wlock
    stopper = threading.Thread(target=pool.terminate, daemon=True)
    try:
        pool._health.terminating = True  # the death is not reported
        (worker,) = _pool._stdlib.worker_processes(pool)
        pool.apply_async(_die_holding_the_results_lock)
        worker.join(T)
        assert worker.exitcode == -signal.SIGKILL
        assert not lock.acquire(timeout=0.1), "the dead worker holds the lock"
        stopper.start()
        stopper.join(T)
        assert not stopper.is_alive(), "terminate waited for the dead worker's lock"
    finally:
        if stopper.is_alive():
            lock.release()  # let the stuck terminate finish
            stopper.join(T)


_DROPPED_AFTER_A_DEATH = """
import gc, sys, warnings, weakref
import multiprocessing as mp
import memshare as ms

if __name__ == "__main__":
    method, ending, tests = sys.argv[1:]
    sys.path.insert(0, tests)
    from test_pool import _die_holding_the_results_lock
    from memshare._pool import _stdlib

    pool = ms.Pool(1, context=mp.get_context(method))
    # Not apply(): a raised error's frames would hold the pool in a cycle.
    errors = []
    call = pool.apply_async(_die_holding_the_results_lock, error_callback=errors.append)
    call.wait(60)
    assert _stdlib.wait_until_released(call, 60)
    print(*(type(e).__name__ for e in errors), flush=True)
    del call, errors
    if ending == "collected":
        alive = weakref.ref(pool)
        warnings.simplefilter("ignore", ResourceWarning)  # "unclosed running pool"
        del pool
        gc.collect()
        print("collected" if alive() is None else "still referenced", flush=True)
    # "exit": the script ends with the pool running, never terminated.
"""


@pytest.mark.parametrize("ending", ["exit", "collected"])
def test_a_pool_never_terminated_ends_although_a_worker_died_holding_a_lock(ctx, ending, tmp_path):
    """A pool that is dropped or left running at exit, without terminate(),
    is ended by the stdlib's finalizer. It wrote to the results queue and
    waited for its lock forever when a worker had died holding it (the
    program hung at exit): it takes memshare's terminate path now."""
    script = tmp_path / "dropped.py"
    script.write_text(_DROPPED_AFTER_A_DEATH)
    shm = Path(os.environ["MEMSHARE_DIR"]) / f"dropped-{ctx.get_start_method()}-{ending}"
    shm.mkdir()
    env = dict(os.environ, MEMSHARE_DIR=str(shm))
    program = subprocess.Popen(
        [sys.executable, str(script), ctx.get_start_method(), ending, str(Path(__file__).parent)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # a hung program goes with its workers
    )
    try:
        stdout, stderr = program.communicate(timeout=T)
        want = ["WorkerLostError", "collected"][: 2 if ending == "collected" else 1]
        assert (program.returncode, stdout.split()) == (0, want), stderr
        assert "Traceback" not in stderr, stderr
        assert list(shm.iterdir()) == [], "the program left its arena behind"
    finally:
        if program.poll() is None:  # it hung at its end
            # SIGTERM: the resource tracker ignores it and then unlinks what
            # the program leaked; the pool's workers and the program do not.
            os.killpg(program.pid, signal.SIGTERM)
            program.communicate(timeout=T)
        _native.collect_garbage(str(shm))
        shutil.rmtree(shm, ignore_errors=True)


def test_killed_worker_executor_raises_broken_pool(ctx):
    arr = np.ones((512, 1024))
    with ProcessPoolExecutor(2, mp_context=ctx) as ex:
        f = ex.submit(hold_then_die, arr)
        with pytest.raises(concurrent.futures.process.BrokenProcessPool):
            f.result(T)
        with pytest.raises(concurrent.futures.process.BrokenProcessPool):
            ex.submit(square, 2).result(T)


def slow_identity(x, event_path):
    # wait until the parent has been interrupted (bounded)
    import time

    deadline = time.monotonic() + T
    while not os.path.exists(event_path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return x


def test_keyboard_interrupt_leaves_no_shared_memory(tmp_path):
    arr = np.ones((512, 1024))
    flag = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        with Pool(2) as pool:
            r = pool.starmap_async(slow_identity, [(arr, str(flag))])  # one worker waits
            pool.apply_async(interrupt_parent, (os.getpid(),))
            try:
                r.get(T)
            finally:
                flag.touch()
    # leftover check: autouse fixture


def _send_a_stray_result(outqueue) -> None:
    """Puts a result for a call that does not exist on a pool's result queue,
    as a worker does, then exits normally: its pin stays for the receiver."""
    stray = ms.share(np.arange(1 << 18, dtype=np.float64))  # 2 MiB
    outqueue.put((-1, 0, (True, _pool._packing._pack(("stray", stray)))))


def test_a_result_the_pool_reads_but_cannot_deliver_is_released():
    """The stdlib's result handler drops results it cannot deliver (of a
    call that is gone, and all it reads once the pool terminates). A worker
    that exited normally left such a result's pin for the parent: the parent
    opens every result as it reads it, so the memory goes with it."""
    ctx = mp.get_context("fork")
    with Pool(1, context=ctx) as pool:
        before = ms.stats()
        sender = ctx.Process(target=_send_a_stray_result, args=(pool._outqueue,))
        sender.start()
        sender.join(T)
        assert sender.exitcode == 0
        # Results are read in order: once this one is back, so was the stray.
        assert pool.apply(identity, (7,)) == 7
        gc.collect()
        after = ms.stats()
        assert (after["pins"], after["live_blocks"]) == (before["pins"], before["live_blocks"])


def test_terminate_with_unconsumed_tasks_releases_pins():
    arr = np.ones((512, 1024))
    pool = Pool(1)
    it = pool.imap(describe_pair, ((arr, i) for i in range(200)))
    assert next(it)[1] is True
    pool.terminate()
    pool.join()
    del it


# --- allocator hook: Rust-side pointer routing is unit-tested in numpy_hook.rs -------------


def test_executor_initializer():
    with ProcessPoolExecutor(1, initializer=_set_init, initargs=(7,)) as ex:
        assert ex.submit(get_init, 0).result(T) == 7
        assert ex.submit(shared_allocation_threshold).result(T) == 1 << 20


# --- the standard library's behaviour, where memshare pickles itself --------------


class _Dummy:
    pass


def make_dummy(_):
    return _Dummy()


def test_executor_map_keeps_no_reference_to_yielded_results():
    import weakref

    with ProcessPoolExecutor(2, mp_context=mp.get_context("fork")) as ex:
        for obj in ex.map(make_dummy, range(6), chunksize=2):
            ref = weakref.ref(obj)
            del obj
            gc.collect()
            assert ref() is None


class _ExitAtUnpickle:
    def __reduce__(self):
        return (os._exit, (1,))


class _ErrorAtUnpickle:
    def __reduce__(self):
        return (fail_on, (3,))


@pytest.mark.parametrize("bad", [_ExitAtUnpickle, _ErrorAtUnpickle])
def test_executor_argument_unpickled_where_the_stdlib_does(bad):
    """An argument that cannot be unpickled in the worker breaks the executor
    (BrokenProcessPool), as in the standard library."""
    with ProcessPoolExecutor(2, mp_context=mp.get_context("fork")) as ex:
        future = ex.submit(identity, bad())
        with pytest.raises(concurrent.futures.process.BrokenProcessPool):
            future.result(timeout=T)
