"""``memshare.Queue``: a drop-in for ``multiprocessing.Queue`` in shared memory.

The queue is a ring of message slots in one block of memshare's arena,
implemented in Rust (``memshare._native.Queue``): lock-free on the hot path,
blocking through a futex in shared memory (an idle waiter uses no CPU), the
GIL released while waiting. Objects travel as messages (see ``_sharing``):
shared arrays, DataFrames and arrays or buffers of at least
``share_threshold`` bytes go in the message's handle table, the rest is
pickled; the queue owns what the table lists while the message waits, and
the consumer owns it once ``get`` returns: memory is freed when the consumer
drops the object.
See ``docs/queue.md`` for the delivery guarantee when processes are killed.
"""

from __future__ import annotations

import queue
import time
import traceback
from typing import Any

import numpy as np

from . import _native, _sharing
from ._array import SharedArray

__all__ = ["JoinableQueue", "Queue"]

#: Capacity of a queue made with ``maxsize <= 0`` ("unbounded" in
#: multiprocessing): a ring is fixed-size, ``put`` blocks once it holds this many.
UNBOUNDED_CAPACITY = 8192
#: Largest ``maxsize``: every slot takes ``INLINE_SIZE + 16`` bytes of shared memory.
MAX_CAPACITY = 1 << 20
#: Messages (pickles) up to this size are stored in the slot itself; larger
#: ones get a block of their own.
INLINE_SIZE = 240


def _timeout(block: bool, timeout: float | None) -> float | None:
    if not block:
        return 0.0
    if timeout is None:
        return None
    if timeout < 0:
        raise ValueError("'timeout' must be a non-negative number")
    return float(timeout)


def _table_of(obj: Any, threshold: int | None) -> tuple[list, bytes]:
    """The handle table entries and payload of ``obj``'s message, nothing
    pinned yet (the queue pins them for itself as it writes the message). A
    numpy array that travels by handle is one entry and no payload, what
    Rust's ``Queue::get_array`` takes."""
    if type(obj) in (np.ndarray, SharedArray) and not obj.dtype.hasobject:
        entry = _sharing.transport_entry(obj, threshold)
        if entry is not None:
            return [entry], b""
    return _sharing.table_and_payload(obj, threshold)


def _decode(entries: list, payload: bytes) -> Any:
    if not payload and len(entries) == 1:
        return _sharing.rebuild_entry(entries[0])
    return _sharing.loads_message(entries, payload)


def _rebuild(cls: type, handle: bytes, maxsize: int, raise_pickling_errors: bool = False) -> Queue:
    q = cls.__new__(cls)
    q._init(_native.Queue.from_handle(handle), maxsize, raise_pickling_errors)
    return q


class Queue:
    """A process-shared FIFO queue with the ``multiprocessing.Queue`` API.

    Args:
        maxsize: Most messages the queue holds; ``put`` blocks (or raises
            ``queue.Full``) beyond it. ``maxsize <= 0`` gives a queue of
            ``UNBOUNDED_CAPACITY`` messages (a shared ring cannot grow).
        raise_pickling_errors: ``put`` of an object that cannot be pickled
            raises the error in the caller. By default it is reported as the
            standard library's feeder thread does (the traceback goes to
            stderr through ``_on_queue_feeder_error(e, obj)``, which
            subclasses may override), the object is dropped and ``put``
            returns. Travels with the queue to other processes.

    Pass it to ``multiprocessing.Process`` (any start method), through a
    ``Pool`` initializer, or even through another queue: it pickles to a
    small handle (under 256 bytes) of the same shared queue. Unlike ``multiprocessing.Queue``
    there is no feeder thread: when ``put`` returns, the message is in shared
    memory and survives the producer's death.
    """

    def __init__(
        self, maxsize: int = 0, *, ctx: Any = None, raise_pickling_errors: bool = False
    ) -> None:
        # ``ctx`` is accepted for signature compatibility and unused: the
        # queue works the same under every start method.
        if maxsize > MAX_CAPACITY:
            raise ValueError(f"maxsize must be at most {MAX_CAPACITY}, not {maxsize}")
        capacity = maxsize if maxsize > 0 else UNBOUNDED_CAPACITY
        native = _native.Queue(capacity, INLINE_SIZE, self._joinable)
        self._init(native, maxsize, bool(raise_pickling_errors))

    _joinable = False

    def _init(self, native: _native.Queue, maxsize: int, raise_pickling_errors: bool) -> None:
        self._q = native
        self._maxsize = maxsize
        self._raise_pickling_errors = raise_pickling_errors
        self._closed = False
        # As multiprocessing's reader end, which its feeder thread closes
        # once a queue that this process put to is closed.
        self._put_to = False
        self._reader_closed = False

    def __reduce__(self) -> Any:
        args = (type(self), self._q.handle(), self._maxsize, self._raise_pickling_errors)
        return (_rebuild, args)

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        name = type(self).__name__
        return f"<memshare.{name} maxsize={self._maxsize} qsize={self._q.qsize()}{state}>"

    def _check_closed(self) -> None:
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        """Puts ``obj`` on the queue.

        Waits up to ``timeout`` seconds (forever if None) for room, or not at
        all if ``block`` is false, then raises ``queue.Full``. Shared arrays
        and frames in ``obj`` travel by handle; arrays and buffers of at
        least 1 MiB (``_sharing.DEFAULT_SHARE_THRESHOLD``) not yet shared are
        copied into shared memory once.

        An object that cannot be pickled is reported and dropped (see
        ``raise_pickling_errors``), as by ``multiprocessing.Queue``.
        """
        self._check_closed()
        self._put_to = True
        t = _timeout(block, timeout)
        if _sharing.is_plain(obj):  # the hot path of small messages: no arena
            self._q.put(_sharing.plain_message(obj), t)
            return
        deadline = None if t is None else time.monotonic() + t
        try:
            if t is None:
                entries, payload = _table_of(obj, _sharing.DEFAULT_SHARE_THRESHOLD)
            else:
                # Sharing the payload waits for the arena's lock: within the timeout.
                entries, payload = _native.call_with_timeout(
                    t, _table_of, obj, _sharing.DEFAULT_SHARE_THRESHOLD
                )
        except TimeoutError:
            raise queue.Full from None
        except Exception as e:
            if self._raise_pickling_errors:
                raise
            self._on_queue_feeder_error(e, obj)
            return
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        self._q.put_entries(entries, payload, left)

    @staticmethod
    def _on_queue_feeder_error(e: Exception, obj: Any) -> None:
        """Called with the error when ``put`` cannot pickle ``obj`` (unless
        ``raise_pickling_errors``): prints the traceback, as the standard
        library's queue does. Subclasses may override it."""
        traceback.print_exc()

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Removes and returns an object from the queue.

        Waits up to ``timeout`` seconds (forever if None), or not at all if
        ``block`` is false, then raises ``queue.Empty``. The GIL is released
        while waiting.
        """
        self._check_closed()
        entries, payload = self._q.get(_timeout(block, timeout))
        return _decode(entries, payload)

    def put_nowait(self, obj: Any) -> None:
        """Equivalent to ``put(obj, False)``."""
        self.put(obj, False)

    def get_nowait(self) -> Any:
        """Equivalent to ``get(False)``."""
        return self.get(False)

    def qsize(self) -> int:
        """Approximate number of messages in the queue."""
        return self._q.qsize()

    def empty(self) -> bool:
        """True if the queue is empty (approximate while others use it).

        Raises OSError after ``close()`` if this process put to the queue
        (as multiprocessing's queue, whose reader is closed then)."""
        if self._reader_closed:
            raise OSError("handle is closed")
        return self._q.qsize() == 0

    def full(self) -> bool:
        """True if the queue is full (approximate while others use it)."""
        return self._q.qsize() >= self._q.capacity

    def close(self) -> None:
        """This process will put and get no more (as in multiprocessing:
        other processes are not affected). Messages already put stay in the
        queue; the queue's memory is freed when no process holds it any more."""
        self._closed = True
        if self._put_to:
            self._reader_closed = True

    def join_thread(self) -> None:
        """No-op: memshare queues have no feeder thread, ``put`` has finished
        writing when it returns."""

    def cancel_join_thread(self) -> None:
        """No-op (there is no feeder thread to wait for)."""

    def shutdown(self) -> None:
        """Shuts the queue down in every process: puts raise ValueError, gets
        return what is left then raise ValueError, blocked callers wake up."""
        self._q.shutdown()

    def fileno(self) -> int:
        """Not supported: the queue wakes waiters through a futex in shared
        memory, which has no file descriptor (see docs/queue.md for waiting
        on a queue from asyncio)."""
        raise OSError("memshare.Queue has no file descriptor; see docs/queue.md")


class JoinableQueue(Queue):
    """A :class:`Queue` with ``task_done`` and ``join``, like
    ``multiprocessing.JoinableQueue``; the count of unfinished tasks lives in
    shared memory."""

    _joinable = True

    def task_done(self) -> None:
        """Marks a task taken with ``get`` as done; ValueError if called
        more often than messages were put."""
        self._q.task_done()

    def join(self, timeout: float | None = None) -> bool:
        """Blocks until every message put has been marked done (GIL released).
        Returns False if ``timeout`` seconds passed first."""
        return self._q.join(timeout)
