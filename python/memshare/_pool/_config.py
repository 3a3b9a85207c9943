"""Settings shared by the pools: the sharing threshold and the copy counters."""

from __future__ import annotations

import os
import threading

from .._sharing import DEFAULT_SHARE_THRESHOLD as DEFAULT_SHARE_THRESHOLD  # the one default

#: Copies into shared memory made by the pools of this process (for tests and
#: curious users): arguments copied in the parent, results copied in workers.
counters = {"shared_arguments": 0, "shared_results": 0}
_counter_lock = threading.Lock()


def _count(name: str) -> None:
    with _counter_lock:
        counters[name] += 1


def check_process_slots(workers: int | None) -> None:
    """Refuses, before any worker starts, a pool that needs more process slots
    than the arena has free (each attached process takes one)."""
    from .. import _native

    n = (os.cpu_count() or 1) if workers is None else workers
    if not isinstance(n, int) or n < 1:
        return  # the standard library reports it
    s = _native.stats()
    free = s["max_processes"] - s["processes"]
    if n > free:
        raise _native.SharedMemoryError(
            f"memshare: a pool of {n} worker processes needs {n} process slots, but the "
            f"arena has {free} free of {s['max_processes']} (one per attached process, "
            f"{s['processes']} in use); use at most {max(free, 1)} workers "
            f"(e.g. processes={max(free, 1)})"
        )


def _check_threshold(threshold: int | None) -> int | None:
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ValueError(f"share_threshold must be a positive int or None, not {threshold!r}")
    return threshold
