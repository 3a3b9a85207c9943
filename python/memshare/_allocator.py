"""numpy arrays born in shared memory (numpy's allocator hook, NEP 49).

Inside :func:`allocate_in_shared_memory`, numpy places the data of every new
array of at least ``threshold`` bytes in memshare's arena instead of private
memory. Such arrays are plain ``numpy.ndarray`` objects; they travel between
processes by handle (through ``multiprocessing``, ``concurrent.futures`` and
memshare's Pool and Queue) instead of being copied. Smaller arrays stay with
numpy's default allocator.

numpy keeps the allocator in a context variable, so the switch applies to the
current thread (and asyncio task) only, and every array remembers the
allocator that made it: arrays created inside the block are freed correctly
after it ends. memshare's pool workers run with it switched on.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from . import _native
from ._sharing import DEFAULT_SHARE_THRESHOLD

__all__ = ["DEFAULT_THRESHOLD", "allocate_in_shared_memory", "shared_allocation_threshold"]

#: Arrays of at least this many bytes go to shared memory by default: the one
#: ``share_threshold`` default of ``_sharing`` (1 MiB).
DEFAULT_THRESHOLD = DEFAULT_SHARE_THRESHOLD

_handlers: dict[int, object] = {}
_lock = threading.Lock()


def _handler(threshold: int) -> object:
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ValueError(f"threshold must be a positive number of bytes, not {threshold!r}")
    with _lock:
        h = _handlers.get(threshold)
        if h is None:
            h = _handlers[threshold] = _native.numpy_allocator(threshold)
        return h


def _enable(threshold: int) -> object:
    """Switches the hook on for the rest of this context; returns the previous handler."""
    return _native.numpy_set_allocator(_handler(threshold))


@contextlib.contextmanager
def allocate_in_shared_memory(threshold: int = DEFAULT_THRESHOLD) -> Iterator[None]:
    """Makes numpy allocate large arrays in shared memory inside the block.

    Args:
        threshold: arrays whose data takes at least this many bytes are placed
            in shared memory; smaller ones stay in ordinary memory.

    Example:
        >>> with ms.allocate_in_shared_memory():
        ...     big = np.zeros((1000, 1000))   # 8 MB, in shared memory
        >>> ms.is_shared(big)
        True

    Usable as a decorator too. Off by default except in memshare pool workers.
    """
    previous = _enable(threshold)
    try:
        yield
    finally:
        _native.numpy_set_allocator(previous)


def shared_allocation_threshold() -> int | None:
    """The threshold of the allocator hook in this context, None when it is off."""
    return _native.numpy_allocator_threshold(_native.numpy_get_allocator())
