"""Releases put off to the next transaction (crates/memshare/src/arena/
releases.rs): when a process drops its last reference to a block that
others may hold too (one it sent, or a received one up to 16 MiB), it clears
its holder bit at its next arena call, at the caches' flush or at its decay
thread's next tick, instead of taking the lock at once. The block stays
alive and unused meanwhile, a forked child does not inherit it, an idle
process lets it go by itself, and a killed one leaves nothing."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import signal
import time

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


def _drop_received(dropped: bytes, kept: bytes, conn) -> None:
    a, b = ms.loads(dropped), ms.loads(kept)  # b keeps the arena attached
    size = a.nbytes
    del a
    conn.send((size, _native.held_back_bytes()))
    conn.poll(T)
    del b


@pytest.mark.parametrize("mib", [1, 32])
def test_a_large_received_block_is_released_at_once(mib):
    """A receiver is most often the last holder: a large block it drops is
    freed at once (the next large allocation may need it), a small one at
    its next call."""
    spawn = mp.get_context("spawn")
    a, b = ms.zeros((mib << 20) // 8), ms.zeros(8)
    here, there = spawn.Pipe()
    p = spawn.Process(target=_drop_received, args=(ms.dumps(a), ms.dumps(b), there))
    p.start()
    try:
        assert here.poll(T)
        size, held_back = here.recv()
        here.send("done")
    finally:
        _end(p)
    assert size == mib << 20
    if mib == 1:
        assert held_back >= size, "a small received block's release is put off"
    else:
        assert held_back < size, "a large received block is released at once"
    del a, b


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
