"""What the speed-ups add: the arena-lock counter, page tables populated ahead
of use (MEMSHARE_POPULATE=1), and the huge-page advice with its fallback
(MEMSHARE_HUGEPAGES). Children are spawned so that they read the switches."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import memshare as ms
from memshare import _native, _sharing

SPAWN = mp.get_context("spawn")
BIG = 64 << 20  # above the populating threshold
TIMEOUT = 600


def test_lock_acquisitions_count_each_transaction():
    a = ms.empty(16)  # the arena exists and is mapped
    del a
    gc.disable()
    try:
        _native.flush_block_cache()  # nothing cached: the first allocation locks
        _sharing._process_lease()  # made once per process (for ms.dumps)
        before = ms.stats()["lock_acquisitions"]
        a = ms.empty(1024)  # one transaction: the allocation
        first = ms.stats()["lock_acquisitions"]
        del a  # none: made here and never shared, it goes to this process's cache
        b = ms.empty(1024)  # none: the cached block again
        reused = ms.stats()["lock_acquisitions"]
        ms.loads(ms.dumps(b))  # a pin and an open
        del b  # none: a block that was shared is released at the next call
        after = ms.stats()["lock_acquisitions"]
    finally:
        gc.enable()
    assert (first - before, reused - first) == (1, 0)
    assert after - reused == 2
    assert ms.stats()["lock_acquisitions"] == after  # reading the figure takes no count


def test_a_queued_array_costs_one_lock_to_put_and_one_to_get():
    """put pins the array for the queue; get with a timeout looks at the
    lock's word (free: not taken) and opens the array; dropping it takes
    none (released at the next call)."""
    q = ms.Queue()
    a = ms.zeros(1024)
    gc.disable()
    try:
        q.put(a, timeout=TIMEOUT)  # the first put: the queue's own setup
        q.get(timeout=TIMEOUT)
        before = ms.stats()["lock_acquisitions"]
        q.put(a, timeout=TIMEOUT)
        put = ms.stats()["lock_acquisitions"]
        b = q.get(timeout=TIMEOUT)
        got = ms.stats()["lock_acquisitions"]
        del b
        dropped = ms.stats()["lock_acquisitions"]
    finally:
        gc.enable()
    assert (put - before, got - put, dropped - got) == (1, 1, 0)
    del a, q


def _present_pages(arr: np.ndarray) -> tuple[int, int]:
    """(pages of ``arr`` whose page-table entry is present, pages of ``arr``)."""
    page = os.sysconf("SC_PAGE_SIZE")
    lo, hi = np.lib.array_utils.byte_bounds(arr)
    first, last = lo // page, (hi - 1) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        raw = f.read((last - first + 1) * 8)
    entries = struct.unpack(f"{len(raw) // 8}Q", raw)
    return sum(e >> 63 for e in entries), len(entries)


def _reallocates_without_populating_again() -> None:
    n = (80 << 20) // 8  # above the per-process cache: freed to the shared heap
    ms.set_retain(1 << 40)  # a stall of 5 s after the free must not punch its pages
    with ms.allocate_in_shared_memory():
        before = _native.numpy_allocator_stats()["populated_ahead"]
        first = np.empty(n)  # written by nobody: present pages come from the hook
        assert ms.is_shared(first)
        present, pages = _present_pages(first)
        assert present == pages
        address = first.__array_interface__["data"][0]
        del first
        again = np.empty(n)
        assert again.__array_interface__["data"][0] == address
        present, pages = _present_pages(again)
        populated = _native.numpy_allocator_stats()["populated_ahead"] - before
        del again
    assert populated == 1, "the block this process wrote last was populated again"
    assert present == pages, "its pages are still mapped here"
    assert ms.stats()["live_blocks"] == 0


def test_a_block_this_process_wrote_last_is_not_populated_again(in_own_arena):
    """The numpy hook populates a large block's page tables ahead of its
    writes, unless the block is one whose pages this process still maps:
    walking them again costs some 5 ms per 200 MB and maps nothing."""
    in_own_arena("_reallocates_without_populating_again")


def _receive_and_report(q, back, wait: bool) -> None:
    a = q.get(timeout=TIMEOUT)
    if not wait:
        del a  # dropped at once: the populating stops or finds the block gone
        idle = _native.populate_idle(TIMEOUT)
        b = ms.zeros(1 << 20)  # the arena still works
        back.put((idle, float(b.sum()), None, None, ms.stats()["populated_bytes"]))
        return
    idle = _native.populate_idle(TIMEOUT)
    present, pages = _present_pages(a)
    back.put((idle, float(a[:: 1 << 16].sum()), present, pages, ms.stats()["populated_bytes"]))


def _run_receiver(monkeypatch, wait: bool, populate: str):
    monkeypatch.setenv("MEMSHARE_POPULATE", populate)
    q, back = ms.Queue(2), ms.Queue(2)
    p = SPAWN.Process(target=_receive_and_report, args=(q, back, wait))
    p.start()
    try:
        a = ms.full(BIG // 8, 2.0)
        q.put(a, timeout=TIMEOUT)
        if not wait:
            del a  # the receiver holds the last reference
        result = back.get(timeout=TIMEOUT)
    finally:
        p.join(TIMEOUT)
        if p.is_alive():
            p.kill()
            p.join(TIMEOUT)
    assert p.exitcode == 0
    return result


def test_received_block_has_its_page_tables_filled_ahead_of_use(monkeypatch):
    idle, total, present, pages, populated = _run_receiver(monkeypatch, True, "1")
    assert idle
    assert total == 2.0 * len(range(0, BIG // 8, 1 << 16))
    # every page was mapped by the background thread (the strided sum above
    # ran after the check and touches one page in 128)
    assert present == pages
    assert populated >= BIG


def test_populating_off_by_default_leaves_page_tables_to_the_reader(monkeypatch):
    idle, total, present, pages, populated = _run_receiver(monkeypatch, True, "")
    assert idle
    assert total == 2.0 * len(range(0, BIG // 8, 1 << 16))
    assert populated == 0
    assert present < pages  # nothing touched but the header page (if any)


def test_block_freed_while_being_populated(monkeypatch):
    # The receiver drops the only reference right after get: the block is
    # freed (by its process) while the thread may still be populating it.
    idle, total, _, _, populated = _run_receiver(monkeypatch, False, "1")
    assert idle
    assert total == 0.0
    assert populated <= BIG + (8 << 20)  # stopped at the block's end at the latest


def _huge_page_child(back) -> None:
    a = ms.full(BIG // 8, 3.0)
    back.put((float(a[::4096].sum()), len(a[::4096])))


@pytest.mark.parametrize("policy", ["auto", "never"])
def test_huge_page_advice_falls_back_to_small_pages(monkeypatch, policy):
    # On a tmpfs that gives no huge pages (/dev/shm with shmem_enabled
    # "never", as on the test machines) the advice must change nothing but
    # the page size: allocation, writes and reads work as before.
    monkeypatch.setenv("MEMSHARE_HUGEPAGES", policy)
    back = ms.Queue(2)
    p = SPAWN.Process(target=_huge_page_child, args=(back,))
    p.start()
    try:
        total, n = back.get(timeout=TIMEOUT)
    finally:
        p.join(TIMEOUT)
        if p.is_alive():
            p.kill()
            p.join(TIMEOUT)
    assert p.exitcode == 0
    assert total == 3.0 * n


# --- switches: a value that means nothing is an error, never silently ignored ----

SWITCH_PROBE = (
    "import numpy as np, memshare as ms\n"
    "try:\n"
    "    ms.share(np.ones(1000))\n"
    "    print('ok')\n"
    "except ValueError as e:\n"
    "    print('ValueError', e)\n"
)


def _run_with(env_extra: dict[str, str]) -> str:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("MEMSHARE_") or k == "MEMSHARE_DIR"
    }
    env.update(env_extra)
    out = subprocess.run(
        [sys.executable, "-c", SWITCH_PROBE], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize(
    ("name", "value", "accepted"),
    [
        ("MEMSHARE_HUGEPAGES", "always", "auto"),
        ("MEMSHARE_HUGEPAGES", "yes", "never"),
        ("MEMSHARE_POPULATE", "yes", "1"),
        ("MEMSHARE_POPULATE", "2", "0"),
    ],
)
def test_bad_switch_values_are_value_errors_naming_the_variable(name, value, accepted):
    out = _run_with({name: value})
    assert out.startswith("ValueError"), out
    assert name in out and accepted in out, out


@pytest.mark.parametrize(
    ("name", "value"),
    [("MEMSHARE_HUGEPAGES", "never"), ("MEMSHARE_HUGEPAGES", ""), ("MEMSHARE_POPULATE", "1")],
)
def test_good_switch_values_are_taken(name, value):
    assert _run_with({name: value}) == "ok"
