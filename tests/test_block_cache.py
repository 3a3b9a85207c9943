"""The per-process cache of free blocks (crates/memshare/src/arena/cache.rs):
a block a process made and never shared is reused by its next allocation
of that size without the arena's lock; anything shared, forked or killed
goes through the shared heap as before."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import random
import signal

import numpy as np
import pytest

import memshare as ms
from memshare import _native

START_METHODS = [m for m in ("fork", "spawn", "forkserver") if m in mp.get_all_start_methods()]
T = 60  # seconds: the bound of every blocking call
N = 1 << 17  # float64 items: a 1 MiB block


def _address(a: np.ndarray) -> int:
    return _native.data_address(a)


def _end(p) -> None:
    """Joins a child, killed if it does not end within the bound."""
    p.join(T)
    if p.is_alive():
        p.kill()
        p.join(T)


def test_a_freed_private_block_is_reused_without_the_lock():
    ms.reap()  # nothing of an earlier test's dead processes is freed meanwhile
    gc.collect()
    gc.disable()  # nor garbage of earlier tests
    try:
        a = ms.zeros(N)
        a[:] = 5.0
        base = ms.stats()
        del a
        s = ms.stats()
        b = ms.zeros(N)
        after = ms.stats()
    finally:
        gc.enable()
    assert s["cached_bytes"] >= N * 8, "freed into this process's cache"
    # This process counts its cache as free (others count it as in use). The
    # block may be one an earlier test cached, up to a third larger.
    freed = base["bytes_in_use"] - s["bytes_in_use"]
    assert N * 8 <= freed <= N * 8 * 4 // 3
    assert s["live_blocks"] == base["live_blocks"] - 1
    assert after["lock_acquisitions"] == s["lock_acquisitions"], "taken without the lock"
    assert N * 8 <= after["bytes_in_use"] - s["bytes_in_use"] <= N * 8 * 4 // 3
    assert not b.any(), "zeros are zeros in a reused block"
    del b


def test_blocks_that_were_shared_go_back_to_the_shared_heap():
    a = ms.zeros(N)
    cached = ms.stats()["cached_bytes"]
    back = ms.loads(ms.dumps(a))  # a handle was made: not private any more
    assert _address(back) == _address(a)
    del a, back
    assert ms.stats()["cached_bytes"] == cached
    r = ms.zeros(N, dtype=np.uint8)
    assert ms.is_shared(r)  # the first allocation of a size still works
    del r


def test_live_allocations_never_share_a_block():
    rng = random.Random(7)
    live: dict[int, tuple[np.ndarray, int]] = {}
    for step in range(400):
        if live and rng.random() < 0.45:
            del live[rng.choice(list(live))]
        else:
            n = rng.choice([N // 4, N, N + 1000, 2 * N])
            a = ms.empty(n)
            a.fill(step)
            live[step] = (a, step)
        for arr, value in live.values():
            assert arr[0] == value and arr[-1] == value
    addresses = [_address(a) for a, _ in live.values()]
    assert len(set(addresses)) == len(addresses)
    live.clear()


def _hold_and_check(n: int, ready, done, out) -> None:
    mine = ms.zeros(n)
    mine.fill(1.0)
    ready.set()
    if not done.wait(T):
        out.put("timed out")
        return
    out.put("ok" if (mine == 1.0).all() else "overwritten")


@pytest.mark.skipif("fork" not in START_METHODS, reason="fork is not available here")
def test_a_forked_child_and_its_parent_never_reuse_the_same_block():
    """The parent's cache goes back to the heap before the fork, so the
    child's allocation and the parent's next one are different blocks."""
    ctx = mp.get_context("fork")
    a = ms.zeros(N)
    del a  # cached in the parent
    assert ms.stats()["cached_bytes"] > 0
    ready, done, out = ctx.Event(), ctx.Event(), ctx.Queue()
    p = ctx.Process(target=_hold_and_check, args=(N, ready, done, out))
    p.start()
    try:
        assert ready.wait(T)
        assert ms.stats()["cached_bytes"] == 0, "flushed before the fork"
        b = ms.zeros(N)
        b.fill(2.0)
        done.set()
        assert out.get(timeout=T) == "ok"
        del b
    finally:
        _end(p)
    assert p.exitcode == 0


def test_the_cache_gives_way_under_the_limit():
    """A process's cache counts against the arena's limit: an allocation that
    needs the room flushes it rather than failing."""
    base = ms.stats()
    limit = base["bytes_in_use"] + (64 << 20)
    ms.set_limit(limit)
    try:
        a = ms.zeros(N)
        del a
        assert ms.stats()["cached_bytes"] > 0
        big = ms.empty((limit - base["bytes_in_use"]) // 8 - 2 * N)
        big2 = ms.empty(N + N // 2)  # no cached block fits; the cache must give way
        del big, big2
    finally:
        ms.set_limit(None)


def _churn(seed: int, progress) -> None:
    """Allocates and frees private blocks of a few sizes forever (until killed),
    reporting each round."""
    rng = random.Random(seed)
    keep = []
    round_ = 0
    while True:
        for _ in range(8):
            a = ms.empty(rng.choice([N // 2, N, 3 * N]))
            a[:16] = round_
            if rng.random() < 0.3:
                keep.append(a)
        if len(keep) > 6:
            del keep[: rng.randrange(len(keep))]
        round_ += 1
        progress.send(round_)


@pytest.mark.parametrize("method", START_METHODS)
def test_processes_killed_at_random_with_full_caches_leave_nothing(method):
    """Kill-at-random: processes killed while their caches hold blocks (and
    while they allocate and free) leave nothing once reaped, and the arena
    keeps working for the others."""
    ctx = mp.get_context(method)
    rng = random.Random(os.getpid())
    base = ms.stats()
    procs = []
    for seed in range(4):
        parent_end, child_end = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_churn, args=(seed, child_end), daemon=True)
        p.start()
        child_end.close()
        procs.append((p, parent_end, rng.randrange(1, 40)))
    try:
        for p, conn, rounds in procs:
            seen = 0
            while seen < rounds:
                assert conn.poll(T), "a churning process stopped reporting"
                seen = conn.recv()
            os.kill(p.pid, signal.SIGKILL)
    finally:
        for p, conn, _ in procs:
            if p.is_alive():
                p.kill()
            p.join(T)
            conn.close()
    assert all(p.exitcode == -signal.SIGKILL for p, _, _ in procs)
    ms.reap()  # (a churning process may have reaped the others already)
    s = ms.stats()
    assert (s["live_blocks"], s["bytes_in_use"], s["pins"]) == (
        base["live_blocks"],
        base["bytes_in_use"],
        base["pins"],
    ), s
    a = ms.full(3 * N, 4.0)  # the heap the dead processes used is sound
    assert (a == 4.0).all()
    del a


def _make_and_send(n: int, conn) -> None:
    a = ms.full(n, 3.0)
    conn.send(ms.dumps(a))
    del a
    conn.poll(T)  # until the parent holds it


def _prefers_a_free_block_its_process_wrote_last() -> None:
    n = (24 << 20) // 8  # above the 4 MiB of the preference; its own segment
    spawn = mp.get_context("spawn")
    here, there = spawn.Pipe()
    p = spawn.Process(target=_make_and_send, args=(n, there), daemon=True)
    p.start()
    try:
        assert here.poll(T)
        theirs = ms.loads(here.recv())
        here.send("held")
    finally:
        _end(p)
    assert p.exitcode == 0
    mine = ms.full(n, 1.0)
    address = _address(mine)
    del mine
    _native.flush_block_cache()  # into the shared heap first ...
    del theirs  # ... so theirs is the newest free block of the size
    again = ms.empty(n)
    assert _address(again) == address, "took the block another process wrote"
    del again
    assert ms.stats()["live_blocks"] == 0


def test_a_large_allocation_prefers_a_free_block_its_process_wrote_last(in_own_arena):
    """Its pages are in this process's page tables already; one another
    process wrote would cost a page fault per page to write again. (In an
    arena of its own: the free blocks earlier tests left would serve too.)"""
    in_own_arena("_prefers_a_free_block_its_process_wrote_last")
