"""memshare.Queue: multiprocessing.Queue conformance, MPMC load, SIGKILL
faults, and a Rust process on the other end. Every blocking call has a
timeout; no test sleeps to synchronise."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import pickle
import queue
import random
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

import memshare as ms
from memshare._queue import JoinableQueue, Queue

T = 60  # seconds: generous bound on any single blocking call
ROOT = Path(__file__).resolve().parent.parent


def _both(ctx):
    return [Queue, lambda maxsize=0: ctx.Queue(maxsize)]


# --- conformance ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memshare", "multiprocessing"])
def test_api_matches_multiprocessing(kind):
    make = Queue if kind == "memshare" else mp.get_context("spawn").Queue
    q = make(2)
    assert q.empty() and not q.full() and q.qsize() == 0
    q.put(1)
    q.put_nowait("two")
    # Both report full once maxsize messages are in (multiprocessing's
    # feeder thread may lag on qsize, not on full).
    assert q.full()
    with pytest.raises(queue.Full):
        q.put(3, block=False)
    with pytest.raises(queue.Full):
        q.put_nowait(3)
    t0 = time.monotonic()
    with pytest.raises(queue.Full):
        q.put(3, timeout=0.05)
    assert time.monotonic() - t0 >= 0.05
    assert q.get(timeout=T) == 1
    assert q.get_nowait() == "two"
    with pytest.raises(queue.Empty):
        q.get(block=False)
    with pytest.raises(queue.Empty):
        q.get_nowait()
    t0 = time.monotonic()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.05)
    assert time.monotonic() - t0 >= 0.05
    q.put({"a": (1, 2.5, None)})
    assert q.get(True, T) == {"a": (1, 2.5, None)}
    q.close()
    with pytest.raises(ValueError):
        q.put(1)
    with pytest.raises(ValueError):
        q.get(timeout=0.01)
    q.join_thread()
    q.cancel_join_thread()


def test_fifo_and_unbounded():
    q = Queue()
    for i in range(1000):
        q.put_nowait(i)
    assert q.qsize() == 1000
    assert [q.get(timeout=T) for _ in range(1000)] == list(range(1000))
    assert q.empty()


def test_timeouts_to_the_millisecond():
    q = Queue(1)
    for timeout in (0.001, 0.01, 0.1):
        t0 = time.monotonic()
        with pytest.raises(queue.Empty):
            q.get(timeout=timeout)
        assert time.monotonic() - t0 >= timeout


def test_arrays_frames_and_ownership():
    q = Queue(4)
    a = ms.share(np.arange(100_000, dtype=np.float64))
    q.put(a)
    b = q.get(timeout=T)
    assert isinstance(b, ms.SharedArray) and np.shares_memory(a, b)
    plain = np.random.default_rng(0).random((500, 250))
    q.put(plain)  # copied into shared memory once, then by handle
    got = q.get(timeout=T)
    np.testing.assert_array_equal(got, plain)
    q.put((3, plain, "x"))
    cam, arr, s = q.get(timeout=T)
    assert (cam, s) == (3, "x") and np.array_equal(arr, plain)
    del a, b, got, arr
    gc.collect()
    # Nothing but the queue itself is left; messages put and dropped unread
    # are freed with the queue.
    assert ms.stats()["live_blocks"] == 1
    q.put(np.ones(100_000))
    del q
    gc.collect()
    assert ms.stats()["live_blocks"] == 0


def _hold_arena_lock(locked, release):
    from memshare import _native

    _native._debug_hold_arena_lock()
    locked.set()
    release.wait(T)
    _native._debug_release_arena_lock()


@pytest.mark.parametrize("wrap", [lambda a: a, lambda a: ("frame", a, 3)], ids=["array", "tuple"])
def test_a_put_pins_the_array_for_the_queue_in_one_transaction(wrap):
    """Putting a shared array pins it for the queue, once, as the message is
    written: one arena transaction (it used to pin it for the sender and
    then move the pin: two; before that, three, the last after the message
    was published, in the consumer's way)."""
    q = ms.Queue()
    a = ms.zeros(1000)
    q.put(wrap(a))  # the first put and get warm what they use
    q.get(timeout=T)
    before = ms.stats()
    q.put(wrap(a))
    after = ms.stats()
    assert after["lock_acquisitions"] - before["lock_acquisitions"] == 1
    assert after["pins"] == before["pins"] + 1  # the queue's
    got = q.get(timeout=T)
    got = got if isinstance(got, np.ndarray) else got[1]
    assert np.shares_memory(got, a)
    assert ms.stats()["pins"] == before["pins"]
    del got, a
    q.close()


@pytest.mark.parametrize("put", ["array", "tuple", "large pickle"])
def test_get_that_times_out_on_the_arena_lock_keeps_the_message(put):
    """A get whose deadline passes while another process holds the arena
    lock raises Empty and leaves the message in the queue (it used to take
    the message and drop it)."""
    message = {
        "array": ms.share(np.arange(1000.0)),
        "tuple": (7, ms.share(np.arange(1000.0)), "x"),
        "large pickle": list(range(10_000)),  # its own block, no table
    }[put]
    q = Queue(4)
    q.put(message, timeout=T)
    ctx = mp.get_context("fork")
    locked, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_arena_lock, args=(locked, release))
    holder.start()
    try:
        assert locked.wait(T)
        with pytest.raises(queue.Empty):
            q.get_nowait()
        with pytest.raises(queue.Empty):
            q.get(timeout=0.2)
        assert q.qsize() == 1
    finally:
        release.set()
        holder.join(T)
    assert holder.exitcode == 0
    got = q.get(timeout=T)
    if put == "tuple":
        assert got[0] == 7 and got[2] == "x" and np.array_equal(got[1], np.arange(1000.0))
    elif put == "array":
        assert np.array_equal(got, np.arange(1000.0))
    else:
        assert got == message
    del got, message, q
    gc.collect()


def test_joinable_queue():
    q = JoinableQueue()
    q.put(1)
    q.put(2)
    assert not q.join(timeout=0.01)
    q.get(timeout=T)
    q.task_done()
    q.get(timeout=T)
    q.task_done()
    assert q.join(timeout=T)
    with pytest.raises(ValueError):
        q.task_done()


def test_pickles_to_the_same_queue():
    q = Queue(3)
    q2 = pickle.loads(pickle.dumps(q))
    q.put("via q")
    assert q2.get(timeout=T) == "via q"
    # A queue can even travel through a queue.
    q.put(q2)
    q3 = q.get(timeout=T)
    q3.put(7)
    assert q.get(timeout=T) == 7


def _echo(qin, qout, n):
    for _ in range(n):
        x = qin.get(timeout=T)
        qout.put(x * 2 if isinstance(x, np.ndarray) else (x, os.getpid()))


def test_processes_all_start_methods(ctx):
    qin, qout = Queue(4), Queue(4)
    p = ctx.Process(target=_echo, args=(qin, qout, 3))
    p.start()
    qin.put("hi", timeout=T)
    msg, pid = qout.get(timeout=T)
    assert msg == "hi" and pid == p.pid
    qin.put(ms.share(np.arange(10.0)), timeout=T)
    np.testing.assert_array_equal(qout.get(timeout=T), np.arange(10.0) * 2)
    qin.put(np.ones((1000, 100)), timeout=T)
    assert qout.get(timeout=T).sum() == 2 * 100_000
    p.join(T)
    assert p.exitcode == 0


def _blocked_getter(q, started):
    started.put("waiting")
    q.get(timeout=T)


def test_idle_waiter_uses_no_cpu():
    ctx = mp.get_context("fork")
    q, started = Queue(1), Queue(1)
    p = ctx.Process(target=_blocked_getter, args=(q, started))
    p.start()
    assert started.get(timeout=T) == "waiting"
    import resource  # noqa: F401 - children's CPU is read from /proc below

    def cpu():
        fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime, clock ticks

    c0 = cpu()
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        q.empty()  # keep the parent doing something harmless
    assert cpu() - c0 <= 2, "a blocked get must sleep on the futex"
    q.put(None)
    p.join(T)
    assert p.exitcode == 0


# --- load ---------------------------------------------------------------------

P, C, N = 4, 4, 100_000


def _producer(q, pid, n):
    for i in range(n):
        q.put((pid, i), timeout=T)


def _consumer(q, cid, counts, disorder):
    last = [-1] * P
    row = counts[cid]
    while True:
        m = q.get(timeout=T)
        if m is None:
            return
        p, i = m
        row[p * N + i] += 1
        if i <= last[p]:
            disorder[cid] += 1
        last[p] = i


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_4x4_producers_consumers_100k_each(method):
    ctx = mp.get_context(method)
    q = Queue(1024)
    counts = ms.zeros((C, P * N), dtype=np.uint8)
    disorder = ms.zeros(C, dtype=np.int64)
    cons = [ctx.Process(target=_consumer, args=(q, c, counts, disorder)) for c in range(C)]
    prods = [ctx.Process(target=_producer, args=(q, p, N)) for p in range(P)]
    for x in cons + prods:
        x.start()
    for x in prods:
        x.join(300)
        assert x.exitcode == 0
    for _ in range(C):
        q.put(None, timeout=T)
    for x in cons:
        x.join(300)
        assert x.exitcode == 0
    total = counts.sum(axis=0)
    assert int((total == 0).sum()) == 0, "messages lost"
    assert int((total > 1).sum()) == 0, "messages duplicated"
    assert int(disorder.sum()) == 0, "per-producer order violated"
    assert q.empty()


# --- faults -------------------------------------------------------------------

MAXSEQ = 1 << 15


def _endless_producer(q, pid, progress):
    rng = random.Random(pid)
    i = 0
    while i < MAXSEQ:
        r = rng.random()
        payload = (
            ms.share(np.full(1000, i, dtype=np.float64))
            if r < 0.3
            else np.full(20_000, i, dtype=np.float64)  # shared on the way
            if r < 0.4
            else b"x" * rng.randrange(0, 2000)
        )
        q.put((pid, i, payload), timeout=T)
        i += 1
        progress[pid] = i  # i messages fully put


def _endless_consumer(q, counts):
    while True:
        pid, i, payload = q.get(timeout=T)
        counts[pid, i] += 1
        del payload


def test_sigkill_producers_and_consumers_at_random():
    """Producers and consumers are SIGKILLed at random instants and replaced.
    Survivors never block; no message is delivered twice; a message whose
    put returned is lost only if a consumer died holding it (at most one per
    killed consumer); no shared memory is left."""
    ctx = mp.get_context("fork")
    rng = random.Random(1234)
    q = Queue(8)
    nprod = 160
    counts = ms.zeros((nprod, MAXSEQ), dtype=np.uint8)
    progress = ms.zeros(nprod, dtype=np.int64)
    next_pid = 0
    consumer_kills = 0

    def new_producer():
        nonlocal next_pid
        p = ctx.Process(target=_endless_producer, args=(q, next_pid, progress))
        next_pid += 1
        p.start()
        return p

    def new_consumer():
        p = ctx.Process(target=_endless_consumer, args=(q, counts))
        p.start()
        return p

    prods = [new_producer() for _ in range(2)]
    cons = [new_consumer() for _ in range(2)]
    deadline = time.monotonic() + 20
    iterations = 0
    while time.monotonic() < deadline and next_pid < nprod - 1:
        # Wait a random instant, observed through the queue's own progress.
        target = int(progress.sum()) + rng.randrange(1, 200)
        t_end = time.monotonic() + 2
        while int(progress.sum()) < target and time.monotonic() < t_end:
            time.sleep(0.0005)
        if rng.random() < 0.5:
            k = rng.randrange(len(prods))
            prods[k].kill()  # no pid race: a no-op if it has exited and been reaped
            prods[k].join(T)
            prods[k] = new_producer()
        else:
            k = rng.randrange(len(cons))
            cons[k].kill()
            cons[k].join(T)
            consumer_kills += 1
            cons[k] = new_consumer()
        iterations += 1
    for p in prods:
        p.kill()
        p.join(T)
    # Let the consumers drain what the producers completed, then stop them.
    t_end = time.monotonic() + 30
    while q.qsize() and time.monotonic() < t_end:
        time.sleep(0.01)
    for p in cons:
        p.kill()
        p.join(T)
        consumer_kills += 1
    # The survivor (this process) drains the rest and can still use the queue.
    while True:
        try:
            pid, i, payload = q.get(timeout=0.2)
        except queue.Empty:
            break
        counts[pid, i] += 1
        del payload
    payload = None
    for k in range(8):
        q.put(k, timeout=T)
    assert [q.get(timeout=T) for _ in range(8)] == list(range(8))

    assert iterations >= 50
    assert int(counts.max()) <= 1, "a message was delivered twice"
    missing = sum(int((counts[pid, : int(progress[pid])] == 0).sum()) for pid in range(next_pid))
    assert missing <= consumer_kills, (missing, consumer_kills)
    q = None  # drop the queue before the leak check
    gc.collect()
    ms.reap()
    s = ms.stats()
    # Only the two bookkeeping arrays remain.
    assert (s["live_blocks"], s["pins"]) == (2, 0), s


# --- Rust peer ----------------------------------------------------------------


def _rust_peer() -> Path:
    """The Rust example binary, (re)built by cargo when cargo is available
    (a no-op when up to date; `make test` builds it beforehand)."""
    exe = ROOT / "target" / "release" / "examples" / "queue_peer"
    if shutil.which("cargo") is not None:
        subprocess.run(
            ["cargo", "build", "--quiet", "--release", "-p", "memshare", "--example", "queue_peer"],
            cwd=ROOT,
            check=True,
            timeout=900,
        )
    if not exe.exists():
        pytest.skip("cargo is needed to build the Rust queue peer")
    return exe


def test_rust_producer_python_consumer():
    exe = _rust_peer()
    q = Queue(4)
    n = 50
    proc = subprocess.Popen([exe, "produce", q._q.handle().hex(), str(n)])
    for i in range(n):
        a = q.get(timeout=T)
        assert isinstance(a, ms.SharedArray) and a.dtype == np.float64
        assert a.shape == (i + 1, 4)
        np.testing.assert_array_equal(a.ravel(), i * 1000 + np.arange(a.size))
    assert proc.wait(T) == 0


def test_rust_echo_peer_returns_every_message_in_order():
    """queue_peer echo (the Rust end of bench_queue's floor figure) gets
    each message from one queue and puts the same bytes on the other."""
    exe = _rust_peer()
    to_rust, back = Queue(4), Queue(4)
    n = 202  # 200 tuples, then a dict holding an array and the array alone
    handles = f"{to_rust._q.handle().hex()},{back._q.handle().hex()}"
    proc = subprocess.Popen([exe, "echo", handles, str(n)])
    frame = ms.share(np.arange(1000.0))
    try:
        for i in range(n - 2):
            to_rust.put((i, "frame"), timeout=T)
            assert back.get(timeout=T) == (i, "frame")
        # Arrays go through Rust by handle: the same memory comes back.
        to_rust.put({"frame": frame}, timeout=T)
        got = back.get(timeout=T)["frame"]
        assert np.shares_memory(got, frame) and got[999] == 999.0
        to_rust.put(frame, timeout=T)
        assert np.shares_memory(back.get(timeout=T), frame)
    finally:
        assert proc.wait(T) == 0
    del got, frame


def test_rust_ping_through_a_rust_echo_reports_its_round_trip():
    exe = _rust_peer()
    a, b = Queue(4), Queue(4)
    n = 300
    echo = subprocess.Popen([exe, "echo", f"{a._q.handle().hex()},{b._q.handle().hex()}", str(n)])
    ping = subprocess.run(
        [exe, "ping", f"{a._q.handle().hex()},{b._q.handle().hex()}", str(n)],
        capture_output=True,
        text=True,
        timeout=T,
    )
    assert echo.wait(T) == 0
    assert ping.returncode == 0, ping.stderr
    words = ping.stdout.split()
    assert words[:2] == ["round", "trip"] and words[3] == "us" and float(words[2]) > 0
    assert a.empty() and b.empty()
    # A wrong number of queues for the mode is a usage error, not a hang.
    bad = subprocess.run([exe, "echo", a._q.handle().hex(), "1"], capture_output=True, timeout=T)
    assert bad.returncode == 1 and b"wrong number of queues" in bad.stderr


def test_python_producer_rust_consumer():
    exe = _rust_peer()
    q = Queue(4)
    n = 20
    proc = subprocess.Popen(
        [exe, "consume", q._q.handle().hex(), str(n)], stdout=subprocess.PIPE, text=True
    )
    arrays = [np.arange((i + 1) * 3, dtype=np.float64).reshape(i + 1, 3) for i in range(n)]
    for a in arrays:
        q.put(ms.share(a), timeout=T)
    out, _ = proc.communicate(timeout=T)
    assert proc.returncode == 0
    got = [line.rsplit(" ", 1) for line in out.splitlines()]
    want = [(f"[{a.shape[0]}, 3]", float(a.sum())) for a in arrays]
    assert [(shape, float(total)) for shape, total in got] == want


class _Unpicklable:
    def __reduce__(self):
        raise AttributeError("cannot pickle this")


def test_unpicklable_put_is_reported_and_dropped_by_default(capfd):
    """As multiprocessing's feeder thread: the error goes to stderr, the
    object is dropped, the queue goes on (and counts nothing for it)."""
    q = Queue(maxsize=1)
    q.put(_Unpicklable())
    assert "cannot pickle this" in capfd.readouterr().err
    q.put(True)
    assert q.qsize() == 1
    assert q.get(timeout=60) is True
    assert q.empty()


def test_raise_pickling_errors_option_travels_with_the_queue():
    q = Queue(raise_pickling_errors=True)
    with pytest.raises(AttributeError, match="cannot pickle this"):
        q.put(_Unpicklable())
    again = pickle.loads(pickle.dumps(q))
    with pytest.raises(AttributeError, match="cannot pickle this"):
        again.put(_Unpicklable())
    assert q.empty()


@pytest.mark.parametrize("kind", [Queue, JoinableQueue])
def test_closed_queue_empty_as_multiprocessing(kind):
    unused = kind()
    unused.close()
    unused.join_thread()
    assert unused.empty()
    used = kind()
    used.put("foo")
    used.close()
    with pytest.raises(OSError, match="is closed"):
        used.empty()
    assert used.qsize() == 1 and not used.full()
    with pytest.raises(ValueError, match="is closed"):
        used.get()
    # Another handle of the same queue (another process's view) still reads it.
    reader = pickle.loads(pickle.dumps(used))
    assert reader.get(timeout=60) == "foo"
