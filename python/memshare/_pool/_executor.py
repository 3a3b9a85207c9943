"""``memshare.ProcessPoolExecutor``: ``concurrent.futures.ProcessPoolExecutor``
with arguments and results that travel by handle."""

from __future__ import annotations

import concurrent.futures
import itertools
import multiprocessing
import time
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from .. import _callables, _native, _process
from ._arguments import _CallState
from ._config import DEFAULT_SHARE_THRESHOLD, _check_threshold
from ._worker import _Call, _home_token, _process_chunk, _reraise, _run_call, _worker_init


def _drop_state(future: concurrent.futures.Future) -> None:
    future._memshare_state = None  # type: ignore[attr-defined]
    if not future.cancelled() and isinstance(future.exception(), BrokenProcessPool):
        try:
            _native.reap()
        except Exception:
            pass


def _result_or_cancel(future: concurrent.futures.Future, timeout: float | None = None) -> Any:
    try:
        try:
            return future.result(timeout)
        finally:
            future.cancel()
    finally:
        del future  # breaks the cycle through an exception's traceback


def _chunks(iterator: Iterator, size: int) -> Iterator[list]:
    while True:
        chunk = list(itertools.islice(iterator, size))
        if not chunk:
            return
        yield chunk


class ProcessPoolExecutor(concurrent.futures.ProcessPoolExecutor):
    """A drop-in ``concurrent.futures.ProcessPoolExecutor`` that moves large
    data by handle.

    Args:
        max_workers, mp_context, initializer, initargs, max_tasks_per_child:
            as for the standard library's executor.
        share_threshold: as for :class:`Pool` (``None`` turns sharing and the
            workers' allocator hook off).

    A worker that dies breaks the executor: pending futures raise
    ``BrokenProcessPool``, as in the standard library.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable | None = None,
        initargs: tuple = (),
        *,
        max_tasks_per_child: int | None = None,
        share_threshold: int | None = DEFAULT_SHARE_THRESHOLD,
    ):
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._share_threshold = _check_threshold(share_threshold)
        kw = {}
        if max_tasks_per_child is not None:
            kw["max_tasks_per_child"] = max_tasks_per_child
        if mp_context is None:  # the standard library's choice
            method = "spawn" if max_tasks_per_child is not None else None
            mp_context = multiprocessing.get_context(method)
        # memshare's processes: the user's initializer goes by value if the
        # workers cannot import it, and so do the tasks' callables.
        mp_context = _process.as_memshare_context(mp_context)
        self._main_by_ref = _callables.main_by_reference(mp_context.get_start_method())
        super().__init__(
            max_workers,
            mp_context,
            _worker_init,
            (self._share_threshold, _home_token(), initializer, tuple(initargs)),
            **kw,
        )

    def _submit_with(self, state: _CallState, fn, args, kwargs) -> concurrent.futures.Future:
        try:
            payload = state.dumps((fn, args, kwargs))
        except Exception as e:  # the stdlib reports it through the future
            future = super().submit(_reraise, e)
        else:
            future = super().submit(_run_call, _Call(payload))
        future._memshare_state = state  # type: ignore[attr-defined]
        future.add_done_callback(_drop_state)
        return future

    def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:
        """Schedules ``fn(*args, **kwargs)``; large arguments are shared once."""
        state = _CallState(self._share_threshold, self._main_by_ref)
        return self._submit_with(state, fn, args, kwargs)

    def map(self, fn, *iterables, timeout=None, chunksize=1):
        """``map(fn, *iterables)`` in the workers, results in order; large
        arguments are shared once for the whole call."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end_time = None if timeout is None else timeout + time.monotonic()
        state = _CallState(self._share_threshold, self._main_by_ref)
        fs = [
            self._submit_with(state, _process_chunk, (fn, chunk), {})
            for chunk in _chunks(zip(*iterables, strict=False), chunksize)
        ]

        def result_iterator():
            # As the stdlib's: neither the future nor the chunk stays
            # referenced here while a result is out with the caller.
            try:
                fs.reverse()
                while fs:
                    if end_time is None:
                        chunk = _result_or_cancel(fs.pop())
                    else:
                        chunk = _result_or_cancel(fs.pop(), end_time - time.monotonic())
                    chunk.reverse()
                    while chunk:
                        yield chunk.pop()
            finally:
                for f in fs:
                    f.cancel()

        return result_iterator()
