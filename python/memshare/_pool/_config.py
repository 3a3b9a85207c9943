"""Settings shared by the pools: the sharing threshold and the copy counters."""

from __future__ import annotations

import threading

DEFAULT_SHARE_THRESHOLD = 1 << 20

#: Copies into shared memory made by the pools of this process (for tests and
#: curious users): arguments copied in the parent, results copied in workers.
counters = {"shared_arguments": 0, "shared_results": 0}
_counter_lock = threading.Lock()


def _count(name: str) -> None:
    with _counter_lock:
        counters[name] += 1


def _check_threshold(threshold: int | None) -> int | None:
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ValueError(f"share_threshold must be a positive int or None, not {threshold!r}")
    return threshold
