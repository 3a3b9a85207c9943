"""Releases put off (crates/memshare/src/arena/releases.rs): when a process
drops its last reference to a block that others may hold too, it marks the
release in its slot and clears its holder bit at its next arena call, at the
caches' flush or at its decay thread's next tick, instead of taking the lock
at once; an allocation of any process that needs the room carries out
everyone's marks first. The block stays alive and unused meanwhile, a forked
child does not inherit it, an idle process lets it go by itself, a stopped
one does not keep it from others, and a killed one leaves nothing."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

import memshare as ms
from memshare import _native

T = 60  # seconds: the bound of every blocking call
N = 1 << 17  # float64 items: a 1 MiB block


def _locks() -> int:
    return ms.stats()["lock_acquisitions"]


def test_dropping_an_array_that_was_sent_takes_no_lock_until_the_next_call():
    gc.collect()
    gc.disable()  # no garbage of earlier tests is freed meanwhile
    try:
        _native.flush_block_cache()  # held back from here on: this test's only
        base = ms.stats()
        a = ms.full(N, 7.0)
        message = ms.dumps(a)  # a handle was made: others may hold it now
        before = _locks()
        del a
        held_back = _native.held_back_bytes()
        after = _locks()
        b = ms.loads(message)  # the next call applies the release first
        reopened = ms.stats()
    finally:
        gc.enable()
    assert after == before, "the drop took the arena's lock"
    assert held_back >= N * 8, "the release was put off"
    assert (b == 7.0).all(), "the block stayed alive: the handle's pin kept it"
    assert reopened["live_blocks"] == base["live_blocks"] + 1
    del b
    assert ms.stats()["live_blocks"] == base["live_blocks"], "freed by the stats call"
    assert _native.held_back_bytes() < N * 8


def test_a_block_whose_release_is_put_off_is_never_handed_out_again():
    kept = ms.full(N, 1.0)
    message = ms.dumps(kept)  # pinned until opened: alive meanwhile
    address = _native.data_address(kept)
    del kept  # its release is put off
    fresh = [ms.full(N, float(i)) for i in range(4)]  # its size, and a lock each
    assert address not in {_native.data_address(f) for f in fresh}
    back = ms.loads(message)
    assert _native.data_address(back) == address
    assert (back == 1.0).all(), "a new allocation wrote into a block still alive"
    for i, f in enumerate(fresh):
        assert (f == float(i)).all()
    del back, fresh


def _receive_two(conn, stop: bool) -> None:
    """Opens two arrays sent through ``conn`` (after this process started, so
    a fork child does not inherit them), drops the first, keeps the second
    (it keeps the arena attached) and reports. Then it stops (``stop``: to
    be killed) or idles, making no memshare call, until told to go on."""
    dropped, kept = conn.recv()
    a, b = ms.loads(dropped), ms.loads(kept)
    total = float(a.sum())
    del a  # the release is put off
    conn.send(total)
    if stop:
        os.kill(os.getpid(), signal.SIGSTOP)  # the parent kills it here
    if conn.poll(T):
        conn.send(float(b.sum()))


def _start_receiver(ctx, stop: bool):
    here, there = ctx.Pipe()
    p = ctx.Process(target=_receive_two, args=(there, stop), daemon=True)
    p.start()
    there.close()
    return p, here


def _end(p) -> None:
    p.join(T)
    if p.is_alive():
        p.kill()  # SIGKILL ends a stopped process too
        p.join(T)


def test_an_idle_process_lets_go_by_itself(ctx):
    """A receiver that drops an array and then makes no memshare call at all
    still releases it: its decay thread does, within a tick or two."""
    base = ms.stats()
    p, conn = _start_receiver(ctx, stop=False)
    try:
        a, b = ms.full(N, 2.0), ms.full(N, 5.0)
        conn.send((ms.dumps(a), ms.dumps(b)))
        assert conn.poll(T) and conn.recv() == 2.0 * N
        del a
        deadline = time.monotonic() + T
        while ms.stats()["live_blocks"] != base["live_blocks"] + 1:
            assert time.monotonic() < deadline, "the idle receiver still holds the block"
            time.sleep(0.05)
        assert p.is_alive(), "released by the living process, not by its exit"
        conn.send("go on")
        assert conn.poll(T) and conn.recv() == 5.0 * N
        del b
    finally:
        _end(p)
    assert p.exitcode == 0


def test_a_process_killed_with_releases_put_off_leaves_nothing(ctx):
    base = ms.stats()
    receivers = [_start_receiver(ctx, stop=True) for _ in range(3)]
    try:
        arrays = [ms.full(N, float(i)) for i in range(2 * len(receivers))]
        for i, (_, conn) in enumerate(receivers):
            conn.send((ms.dumps(arrays[2 * i]), ms.dumps(arrays[2 * i + 1])))
        for i, (_, conn) in enumerate(receivers):
            assert conn.poll(T) and conn.recv() == float(2 * i) * N
        del arrays
    finally:
        for p, _ in receivers:
            p.kill()
            _end(p)
    assert all(p.exitcode == -signal.SIGKILL for p, _ in receivers)
    ms.reap()
    s = ms.stats()
    assert (s["live_blocks"], s["bytes_in_use"], s["pins"]) == (
        base["live_blocks"],
        base["bytes_in_use"],
        base["pins"],
    ), s


def _drop_received(conn, stop: bool) -> None:
    """Opens two arrays sent through ``conn`` (after this process started, so
    a fork child does not inherit them), drops the first and reports; keeps
    the second (it keeps the arena attached) until told to end."""
    if not conn.poll(T):
        return
    dropped, kept = conn.recv()
    a, b = ms.loads(dropped), ms.loads(kept)
    size = a.nbytes
    del a
    conn.send((size, _native.held_back_bytes()))
    if stop:
        os.kill(os.getpid(), signal.SIGSTOP)  # no call of its own from here
    conn.poll(T)
    del b


def _start_dropper(ctx, stop: bool):
    here, there = ctx.Pipe()
    p = ctx.Process(target=_drop_received, args=(there, stop), daemon=True)
    p.start()
    there.close()
    return p, here


def _stopped(pid: int) -> bool:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return fields[0] == "T"


def _large(mib: int) -> int:
    """``mib`` MiB, or less on a small shm directory: put off are releases
    up to 1/32 of it (``releases::cap_bytes``), so at most 1/64."""
    total = shutil.disk_usage(os.environ["MEMSHARE_DIR"]).total
    return min(mib << 20, total // 64 // 4096 * 4096)


def _let_the_dropper_end(p, conn) -> None:
    """Resumes a dropper (stopped or not) and tells it to end; it is killed
    if it does not (see ``_end``)."""
    os.kill(p.pid, signal.SIGCONT)
    try:
        conn.send("done")
    except OSError:
        pass  # it is gone already
    os.kill(p.pid, signal.SIGCONT)  # had it not stopped itself yet before the first
    _end(p)


@pytest.mark.parametrize("mib", [1, 32])
def test_a_received_block_is_put_off_whatever_its_size(mib):
    """Large blocks too: an allocation that needs the room takes it back
    (next test), so a receiver's put-off release keeps nothing from anyone."""
    p, conn = _start_dropper(mp.get_context("spawn"), stop=False)
    try:
        a, kept = ms.zeros(_large(mib) // 8), ms.zeros(8)
        conn.send((ms.dumps(a), ms.dumps(kept)))
        assert conn.poll(T)
        size, held_back = conn.recv()
    finally:
        _let_the_dropper_end(p, conn)
    assert size == _large(mib)
    assert held_back >= size, "the receiver's release is put off"
    del a, kept


def _allocation_takes_back_what_a_stopped_process_put_off(method: str, room: str) -> None:
    """The scenario of the test below, in an arena of its own (``in_own_arena``)."""
    ctx = mp.get_context(method)
    size = _large(32)
    base = ms.stats()
    p, conn = _start_dropper(ctx, stop=True)
    try:
        a, kept = ms.full(size // 8, 7.0), ms.zeros(8)
        conn.send((ms.dumps(a), ms.dumps(kept)))
        assert conn.poll(T)
        dropped, held_back = conn.recv()
        assert dropped == size and held_back >= size, "the receiver's release is put off"
        deadline = time.monotonic() + T
        while not _stopped(p.pid):
            assert time.monotonic() < deadline, "the receiver did not stop"
            time.sleep(0.01)
        del a  # the stopped receiver is its last holder now
        assert ms.stats()["live_blocks"] == base["live_blocks"] + 2
        if room == "limit":
            ms.set_limit(ms.stats()["bytes_in_use"] + size // 2)
        reserved = ms.stats()["bytes_reserved"]
        try:
            # Fits only once the dropped block is freed (MemoryError under the
            # limit; a new segment in a fresh arena with no other free block).
            b = ms.full(size // 8, 1.0)
            s = ms.stats()
            assert s["live_blocks"] == base["live_blocks"] + 2, "dropped one freed"
            assert s["bytes_reserved"] == reserved, "the arena did not grow"
            assert p.is_alive() and _stopped(p.pid), "freed while its holder was stopped"
            assert (b == 1.0).all()
            del b
        finally:
            ms.set_limit(None)
    finally:
        _let_the_dropper_end(p, conn)
    assert p.exitcode == 0
    del kept
    s = ms.stats()
    assert (s["live_blocks"], s["pins"]) == (base["live_blocks"], base["pins"]), s


@pytest.mark.parametrize("room", ["limit", "arena"])
def test_an_allocation_takes_back_what_a_stopped_process_put_off(ctx, room, in_own_arena):
    """A receiver drops the last reference to a block and stops before its
    next call. Another process's allocation that only fits in that block's
    room (under the limit, or without growing the arena) carries out the
    stopped one's release itself."""
    in_own_arena(
        "_allocation_takes_back_what_a_stopped_process_put_off", ctx.get_start_method(), room
    )


def _open_and_check(message: bytes, out) -> None:
    out.put(float(ms.loads(message).sum()))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is not available here")
def test_a_forked_child_does_not_inherit_a_release_put_off():
    """The fork's preparation applies the parent's put-off releases, so the
    child does not hold the block and its exit frees it."""
    fork = mp.get_context("fork")
    base = ms.stats()
    a = ms.full(N, 3.0)
    message = ms.dumps(a)
    del a
    assert _native.held_back_bytes() >= N * 8
    out = fork.Queue()
    p = fork.Process(target=_open_and_check, args=(message, out))
    p.start()
    try:
        assert out.get(timeout=T) == 3.0 * N
    finally:
        _end(p)
    assert p.exitcode == 0
    s = ms.stats()
    assert (s["live_blocks"], s["pins"]) == (base["live_blocks"], base["pins"]), s


def test_an_allocation_that_needs_the_room_gets_it():
    """A release put off counts against the limit until applied, and the
    allocation that needs the room applies it first (same process)."""
    base = ms.stats()
    room = 64 << 20
    ms.set_limit(base["bytes_in_use"] + room)
    try:
        a = ms.empty(room // 8 - N)
        message = ms.dumps(a)
        back = ms.loads(message)
        del a, back  # released at the next call
        b = ms.empty(room // 8 - N)  # fits only once that release is applied
        b[:] = 1.0
        del b
    finally:
        ms.set_limit(None)
