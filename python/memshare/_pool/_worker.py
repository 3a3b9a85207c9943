"""The worker side: setup of every worker and the functions tasks run."""

from __future__ import annotations

import os
import pickle
import signal
import threading
from collections.abc import Callable
from typing import Any

from .. import _allocator, _native, _sharing
from ._packing import _executor_result, _pack, set_worker_threshold


def _home_token() -> str | None:
    """The parent's arena, created now so that workers allocate in it too."""
    try:
        return _native.arena_token()
    except Exception:
        return None


def _worker_init(
    threshold: int | None, arena: str | None, initializer: Callable | None, initargs: tuple
) -> None:
    """Runs first in every worker: the arena, the allocator hook, SIGINT, the
    user's initializer."""
    set_worker_threshold(threshold)
    # One arena for the whole pool: a block the parent frees is recycled by
    # the next result of any worker (fork children inherit it anyway; spawn
    # and forkserver children join it here, before their first allocation).
    if arena and not os.environ.get("MEMSHARE_ARENA"):
        os.environ["MEMSHARE_ARENA"] = arena
    # The parent handles Ctrl-C (and terminates the pool); workers would only
    # print a KeyboardInterrupt traceback each.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if threshold is not None:
        _allocator._enable(threshold)
    if initializer is not None:
        initializer(*initargs)


def _run_direct(mapper: Callable, batch: tuple) -> Any:
    """Pool task of plain items for a plain function (the fast path)."""
    return _pack(mapper(batch))


def _run_packed(payload: bytes) -> Any:
    """Pool task: unpickle the call, run it, pickle the result."""
    _sharing.begin_task()
    fn, args, kwds = pickle.loads(payload)
    return _pack(fn(*args, **kwds))


class _Call:
    """An Executor call pickled by the parent with memshare's pickler.

    It is unpickled where the stdlib unpickles its call items, before the
    task runs: an argument whose unpickling fails or exits breaks the pool
    (``BrokenProcessPool``), as in the standard library, instead of failing
    the task.
    """

    __slots__ = ("payload",)

    def __init__(self, payload: bytes):
        self.payload = payload

    def __reduce__(self):
        return (pickle.loads, (self.payload,))


def _run_call(call: tuple) -> Any:
    """Executor task: run a call (a ``_Call``, unpickled), share a large result."""
    fn, args, kwds = call
    return _executor_result(fn(*args, **kwds))


def _process_chunk(fn: Callable, chunk: list[tuple]) -> list:
    return [fn(*args) for args in chunk]


def _reraise(exc: BaseException) -> Any:
    raise exc
