"""memshare: share numpy arrays and DataFrames between processes without copying.

Data lives in shared memory; only small handles travel between processes;
memory is freed when the last process lets go of it, also when a process
crashes. The README (also this package's description in its metadata) is the
tour; ``docs/`` in the source tree has the details, ``docs/how-it-works.md``
the design.
"""

from __future__ import annotations

import atexit
import multiprocessing.util
import os

from . import _frames, _native
from ._allocator import allocate_in_shared_memory
from ._array import (
    SharedArray,
    empty,
    empty_like,
    full,
    full_like,
    is_shared,
    zeros,
    zeros_like,
)
from ._errors import (
    CorruptSegmentError,
    HandleError,
    SharedMemoryError,
    StaleHandleError,
)
from ._pool import Pool, ProcessPoolExecutor, WorkerLostError
from ._process import Process, get_context
from ._queue import JoinableQueue, Queue
from ._share import share
from ._sharing import DEFAULT_SHARE_THRESHOLD, dumps, loads

__version__: str = _native.__version__
"""memshare's version (the Rust crates' version from Cargo.toml)."""

__all__ = [
    "DEFAULT_SHARE_THRESHOLD",
    "CorruptSegmentError",
    "HandleError",
    "JoinableQueue",
    "Pool",
    "Process",
    "ProcessPoolExecutor",
    "Queue",
    "SharedArray",
    "SharedMemoryError",
    "StaleHandleError",
    "WorkerLostError",
    "allocate_in_shared_memory",
    "dumps",
    "empty",
    "empty_like",
    "full",
    "full_like",
    "get_context",
    "is_shared",
    "loads",
    "reap",
    "set_limit",
    "set_retain",
    "share",
    "stats",
    "zeros",
    "zeros_like",
]


def stats() -> dict:
    """Usage of this process tree's arena, counting the blocks of every process.

    Returns a dict with ``bytes_reserved`` (shared memory taken from the
    system: live objects, headers and the warm cache), ``bytes_in_use`` (held
    by live objects), ``bytes_segments`` (size of the segments, pages given
    back included), ``memfd_segments`` (memory-backed segments, used when the
    shm directory is full), ``retain`` (see :func:`set_retain`), ``live_blocks``,
    ``segments``, ``pins`` (handles sent but not yet received), ``processes``
    attached, and ``limit`` (None if unlimited). Three figures are this
    process's own, counted since it started (or forked):
    ``lock_acquisitions``, how many times it took the arena's shared mutex
    (allocations, frees, handles sent and received, this call excluded);
    ``populated_bytes``, how much of the large blocks it received had their
    page tables filled ahead of use by its background thread; and
    ``cached_bytes``, the free blocks it keeps for its next allocations
    without the lock (blocks it made and never shared, such as numpy
    temporaries; at most 64 MiB, see docs/how-it-works.md). Its own cache
    counts as free in ``bytes_in_use`` and ``live_blocks``; other processes
    count it as in use.
    """
    return _native.stats()


def set_limit(nbytes: int | None) -> None:
    """Caps the arena's shared memory (all processes); None or 0 removes the cap.

    The environment variable ``MEMSHARE_LIMIT`` sets it at start: bytes
    (``1073741824``) or a number with K, M, G or T (``512M``, ``8G``, ``1.5G``);
    ``0`` means no limit, and anything else raises ``ValueError`` naming the
    variable. Allocations beyond the cap raise :class:`SharedMemoryError` (a
    ``MemoryError``).
    """
    _native.set_limit(nbytes)


def set_retain(nbytes: int) -> None:
    """Sets the arena's warm cache: idle free bytes kept for reuse (all processes).

    Freed shared memory stays committed for a few seconds, so bursts of
    allocations reuse warm pages; after that, free space beyond ``nbytes``
    goes back to the OS by itself (a background thread; no call needed).
    The environment variable ``MEMSHARE_RETAIN`` (e.g. ``64M``) sets it at
    start; the default is 16 MiB.
    """
    _native.set_retain(nbytes)


def reap() -> bool:
    """Releases the memory held by processes that died; True if any were found.

    memshare does this by itself within about two seconds (each process that
    allocates checks once a second); call it to reclaim immediately (e.g.
    after killing workers).
    """
    return _native.reap()


def _register_exit(_: object = None) -> None:
    # Pool workers and Process children leave through os._exit(), which skips
    # atexit; multiprocessing runs its finalizers first, so detach there too.
    multiprocessing.util.Finalize(None, _native.shutdown, exitpriority=-100)


class _AfterFork:
    """Anchor for multiprocessing's after-fork registry (held weakly there)."""


_after_fork = _AfterFork()
# Reserves the child's slots (the switch to them happens inside fork()) and
# pauses the decay thread across the fork.
os.register_at_fork(
    before=_native.before_fork,
    after_in_parent=_native.after_fork_parent,
    after_in_child=_native.after_fork_child,
)
# A multiprocessing child clears the finalizers it inherited, then runs the
# after-fork hooks: register the exit hook again there.
multiprocessing.util.register_after_fork(_after_fork, _register_exit)
atexit.register(_native.shutdown)
_register_exit()
# pandas/pyarrow/polars objects pickle by handle (registered lazily: importing
# memshare never imports those packages).
_frames.install()
