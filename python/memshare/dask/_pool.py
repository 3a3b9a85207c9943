"""``memshare.dask.Pool``: the ``multiprocessing.Pool`` surface on a Dask cluster.

Code written for ``ms.Pool`` runs on a cluster by changing the constructor.
Each chunk of a ``map`` is one Dask task; large arguments (the frame of a
``(df, row)`` generator) are scattered once per call and moved between the
processes of a host by handle; results born in shared memory in the workers
come back by handle too. Lazy calls (``imap``, ``imap_unordered``) keep a
bounded number of tasks in flight, so results wait in the cluster only as
long as the consumer is behind.
"""

from __future__ import annotations

import itertools
import multiprocessing
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import distributed

from .._sharing import DEFAULT_SHARE_THRESHOLD
from ._args import Scatterer, call_unwrapped, unwrap

__all__ = ["AsyncResult", "Pool"]

_RUN, _CLOSE, _TERMINATE = "RUN", "CLOSE", "TERMINATE"


def _map_batch(func: Callable, items: list) -> list:
    return [func(x) for x in unwrap(items)]


def _star_batch(func: Callable, items: list) -> list:
    return [func(*x) for x in unwrap(items)]


class AsyncResult:
    """The result of an ``*_async`` call (``multiprocessing.pool.AsyncResult``)."""

    def __init__(
        self,
        fetch: Callable[[], Any],
        callback: Callable | None,
        error_callback: Callable | None,
        on_done: Callable[[AsyncResult], None],
    ):
        self._event = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run,
            args=(fetch, callback, error_callback, on_done),
            name="memshare-dask-result",
            daemon=True,
        )
        self._thread.start()

    def _run(self, fetch, callback, error_callback, on_done) -> None:
        try:
            self._value = fetch()
        except BaseException as e:  # delivered by get()
            self._error = e
        try:
            if self._error is None and callback is not None:
                callback(self._value)
            elif self._error is not None and error_callback is not None:
                error_callback(self._error)
        finally:
            self._event.set()
            on_done(self)

    def ready(self) -> bool:
        """True when the call has completed."""
        return self._event.is_set()

    def successful(self) -> bool:
        """True if the call completed without raising (ValueError if not ready)."""
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._error is None

    def wait(self, timeout: float | None = None) -> None:
        """Waits until the result is available or ``timeout`` seconds pass."""
        self._event.wait(timeout)

    def get(self, timeout: float | None = None) -> Any:
        """The result; re-raises the task's exception; ``multiprocessing.TimeoutError``
        if it is not ready within ``timeout`` seconds."""
        if not self._event.wait(timeout):
            raise multiprocessing.TimeoutError
        if self._error is not None:
            raise self._error
        return self._value


class Pool:
    """``multiprocessing.Pool`` on a Dask cluster.

    Args:
        client: a ``distributed.Client``; :func:`memshare.dask.register` is
            run on it unless it already was.
        share_threshold: arrays and frames of at least this many bytes in the
            arguments are scattered once per call (and move by handle);
            ``None`` sends everything inside the task, as Dask does.

    Methods and ordering are those of ``multiprocessing.Pool`` (``map``,
    ``imap``, ``imap_unordered``, ``starmap``, ``apply`` and their async
    forms, callbacks, ``close``/``join``/``terminate``, context manager).
    Exceptions of tasks are re-raised with the worker's traceback. Large array
    arguments arrive read-only in tasks (they are the memory the client or
    another worker holds); ``.copy()`` one to write into it.
    """

    def __init__(self, client: Any, share_threshold: int | None = DEFAULT_SHARE_THRESHOLD):
        if share_threshold is not None and (
            isinstance(share_threshold, bool)
            or not isinstance(share_threshold, int)
            or share_threshold < 1
        ):
            raise ValueError(
                f"share_threshold must be a positive int or None, not {share_threshold!r}"
            )
        if getattr(client, "_memshare_threshold", None) is None:
            from . import register

            register(client)
        self._client = client
        self._threshold = share_threshold
        self._state = _RUN
        self._lock = threading.Lock()
        self._pending: set[AsyncResult] = set()
        self._futures: set[Any] = set()

    # -- plumbing --------------------------------------------------------------------

    def _check_running(self) -> None:
        if self._state != _RUN:
            raise ValueError("Pool not running")

    def _workers(self) -> int:
        try:
            return max(1, sum(self._client.nthreads().values()))
        except Exception:
            return 1

    def _submit(self, fn: Callable, *args: Any) -> Any:
        future = self._client.submit(fn, *args, pure=False)
        with self._lock:
            self._futures.add(future)
        return future

    def _result(self, future: Any, timeout: float | None = None) -> Any:
        try:
            return future.result(timeout)
        finally:
            with self._lock:
                self._futures.discard(future)
            future.release()

    def _batches(self, func: Callable, iterable: Iterable, chunksize: int, star: bool) -> Iterator:
        """Futures of the chunks of a call, submitted as they are asked for."""
        scatter = Scatterer(self._client, self._threshold)
        runner = _star_batch if star else _map_batch
        it = iter(iterable)
        try:
            while True:
                chunk = list(itertools.islice(it, chunksize))
                if not chunk:
                    return
                self._check_not_terminated()
                yield self._submit(runner, func, [scatter.replace(x) for x in chunk])
        finally:
            scatter.release()

    def _check_not_terminated(self) -> None:
        if self._state == _TERMINATE:
            raise ValueError("Pool was terminated")

    def _chunksize(self, n: int) -> int:
        chunksize, extra = divmod(n, self._workers() * 4)
        return max(1, chunksize + bool(extra))

    def _async(self, fetch: Callable[[], Any], callback, error_callback) -> AsyncResult:
        def done(r: AsyncResult) -> None:
            with self._lock:
                self._pending.discard(r)

        result = AsyncResult(fetch, callback, error_callback, done)
        with self._lock:
            if not result.ready():
                self._pending.add(result)
        return result

    # -- the public surface -------------------------------------------------------------

    def apply_async(self, func, args=(), kwds={}, callback=None, error_callback=None):  # noqa: B006
        """Asynchronous ``func(*args, **kwds)``; see ``multiprocessing.pool.Pool``."""
        self._check_running()
        scatter = Scatterer(self._client, self._threshold)
        future = self._submit(
            call_unwrapped, func, scatter.replace(tuple(args)), scatter.replace(dict(kwds))
        )
        scatter.release()
        return self._async(lambda: self._result(future), callback, error_callback)

    def apply(self, func, args=(), kwds={}):  # noqa: B006
        """``func(*args, **kwds)`` in a worker; returns its result."""
        return self.apply_async(func, args, kwds).get()

    def _map_async(self, func, iterable, star, chunksize, callback, error_callback):
        self._check_running()
        if not hasattr(iterable, "__len__"):
            iterable = list(iterable)
        if chunksize is None:
            chunksize = self._chunksize(len(iterable))
        elif chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize!r}")
        futures = list(self._batches(func, iterable, chunksize, star))

        def fetch() -> list:
            results = []
            try:
                for f in futures:
                    results.extend(self._result(f))
            finally:
                self._client.cancel([f for f in futures if not f.done()])
            return results

        return self._async(fetch, callback, error_callback)

    def map_async(self, func, iterable, chunksize=None, callback=None, error_callback=None):
        """Asynchronous :meth:`map`."""
        return self._map_async(func, iterable, False, chunksize, callback, error_callback)

    def starmap_async(self, func, iterable, chunksize=None, callback=None, error_callback=None):
        """Asynchronous :meth:`starmap`."""
        return self._map_async(func, iterable, True, chunksize, callback, error_callback)

    def map(self, func, iterable, chunksize=None):
        """``[func(x) for x in iterable]`` on the cluster, in order."""
        return self.map_async(func, iterable, chunksize).get()

    def starmap(self, func, iterable, chunksize=None):
        """``[func(*args) for args in iterable]`` on the cluster, in order."""
        return self.starmap_async(func, iterable, chunksize).get()

    def _window(self) -> int:
        return max(4, 2 * self._workers())

    def imap(self, func, iterable, chunksize=1):
        """Lazy :meth:`map`: results in order, as they are consumed."""
        return self._imap(func, iterable, chunksize, ordered=True)

    def imap_unordered(self, func, iterable, chunksize=1):
        """Lazy :meth:`map`: results in completion order."""
        return self._imap(func, iterable, chunksize, ordered=False)

    def _imap(self, func, iterable, chunksize: int, ordered: bool) -> _ResultIterator:
        self._check_running()
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize!r}")
        batches = self._batches(func, iterable, chunksize, False)
        return _ResultIterator(self, batches, self._window(), ordered)

    def close(self) -> None:
        """No new calls; pending ones complete."""
        if self._state == _RUN:
            self._state = _CLOSE

    def terminate(self) -> None:
        """Cancels pending tasks; the cluster stays up (it is the client's)."""
        self._state = _TERMINATE
        with self._lock:
            futures = list(self._futures)
            self._futures.clear()
        if futures:
            self._client.cancel(futures)

    def join(self, timeout: float | None = None) -> None:
        """Waits for pending calls (after ``close()`` or ``terminate()``)."""
        if self._state == _RUN:
            raise ValueError("Pool is still running")
        with self._lock:
            pending = list(self._pending)
        for r in pending:
            r.wait(timeout)

    def __enter__(self) -> Pool:
        self._check_running()
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()

    def __reduce__(self):
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")


class _ResultIterator:
    """Results of ``imap``/``imap_unordered``: keeps ``window`` chunks in flight;
    a failed task raises once, then iteration goes on (as in the stdlib)."""

    def __init__(self, pool: Pool, batches: Iterator, window: int, ordered: bool):
        self._pool = pool
        self._batches = batches
        self._ordered = ordered
        first = list(itertools.islice(batches, window))
        self._queue: deque = deque(first)
        self._completed = None if ordered else distributed.as_completed(first)
        self._ready: deque = deque()

    def __iter__(self) -> _ResultIterator:
        return self

    def __next__(self) -> Any:
        while not self._ready:
            if self._ordered:
                if not self._queue:
                    raise StopIteration
                future = self._queue.popleft()
            else:
                if self._completed.is_empty():
                    raise StopIteration
                future = next(self._completed)
            for extra in itertools.islice(self._batches, 1):
                if self._ordered:
                    self._queue.append(extra)
                else:
                    self._completed.add(extra)
            self._ready.extend(self._pool._result(future))
        return self._ready.popleft()

    def close(self) -> None:
        """Cancels the chunks not consumed yet."""
        pending = list(self._queue) if self._ordered else list(self._completed.futures)
        self._queue.clear()
        if pending:
            self._pool._client.cancel(pending)
        self._batches.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
