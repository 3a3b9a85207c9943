"""``memshare.Pool``: ``multiprocessing.pool.Pool`` with arguments and results
that travel by handle, and calls that fail instead of hanging when a worker dies."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.reduction import ForkingPickler
from typing import Any

from .. import _callables, _native, _process, _sharing
from . import _stdlib
from ._arguments import _CallState
from ._config import DEFAULT_SHARE_THRESHOLD, _check_threshold, check_process_slots
from ._health import WorkerLostError, _Health, _health_of, _make_process
from ._packing import _PLAIN_FUNCTIONS, _unpack
from ._progress import _make_progress
from ._results import _ApplyResult, _IMapIterator, _IMapUnorderedIterator, _MapResult
from ._stdlib import RUN, TERMINATE, mapstar
from ._worker import _home_token, _reraise, _run_direct, _run_packed, _worker_init


def _len_or_none(iterable: Any) -> int | None:
    try:
        return len(iterable)
    except TypeError:
        return None


class Pool(_stdlib.StdPool):
    """A drop-in ``multiprocessing.Pool`` that moves large data by handle.

    Args:
        processes: number of workers (default ``os.cpu_count()``).
        initializer: called as ``initializer(*initargs)`` in each worker.
        initargs: arguments of ``initializer``.
        maxtasksperchild: tasks a worker runs before it is replaced.
        context: a ``multiprocessing`` context (default: the stdlib's default
            start method).
        share_threshold: numpy arrays and pandas/Arrow/polars objects of at
            least this many bytes are shared (arguments once per call) and
            allocated in shared memory by workers; ``None`` turns both off
            (data already in shared memory still goes by handle).
        progress: ``True`` for a progress bar (tqdm when installed) over the
            tasks of ``map``/``imap``/``imap_unordered``/``starmap`` and their
            async forms, or a tqdm-like bar (``update(n)``) or bar class.

    Everything else is ``multiprocessing.pool.Pool``: same methods, defaults,
    ordering and callbacks. A worker that dies makes pending calls raise
    :class:`WorkerLostError` (the stdlib would hang).
    """

    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable | None = None,
        initargs: Iterable = (),
        maxtasksperchild: int | None = None,
        context: Any = None,
        share_threshold: int | None = DEFAULT_SHARE_THRESHOLD,
        progress: Any = False,
    ):
        _stdlib.prepare_pool(self)
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._share_threshold = _check_threshold(share_threshold)
        check_process_slots(processes)
        self._progress_arg = progress
        self._health = _Health()
        _stdlib.set_process_factory(self, functools.partial(_make_process, self._health))
        # memshare's processes: the user's initializer goes by value if the
        # workers cannot import it, and so do the tasks' callables.
        context = _process.as_memshare_context(context)
        self._main_by_ref = _callables.main_by_reference(context.get_start_method())
        super().__init__(
            processes,
            _worker_init,
            (self._share_threshold, _home_token(), initializer, tuple(initargs)),
            maxtasksperchild,
            context,
        )
        self._health.cache = _stdlib.result_cache(self)

    # -- plumbing -------------------------------------------------------------

    def _check_running(self) -> None:
        if self._health.broken is not None:
            raise WorkerLostError(self._health.broken)
        super()._check_running()

    def _get_sentinels(self) -> list:
        # Not the results pipe (see worker_handler_sentinels): 13-27 ms of the
        # parent's CPU per 1,000 tiny results, measured.
        return _stdlib.worker_handler_sentinels(self)

    def _setup_queues(self) -> None:
        super()._setup_queues()
        # Workers keep a call's repeated arguments open between its tasks
        # and let go of them before they wait for work.
        _stdlib.set_task_queue(self, _sharing.worker_holding, _sharing.worker_let_go)
        reader = _stdlib.result_reader(self)

        def get() -> Any:
            data = reader.recv_bytes()
            try:
                task = ForkingPickler.loads(data)
            except Exception:  # an unreadable message names no call
                return (None, 0, (False, None))
            if isinstance(task, tuple) and len(task) == 3:
                # Opened as soon as it is read: the stdlib's result handler
                # drops what it reads once the pool terminates, and a
                # worker that exited normally left its result's pins for us
                # to consume. This is the one place results are opened.
                try:
                    task = (task[0], task[1], _unpack(task[2]))
                except (TypeError, ValueError):  # not a (success, value) pair
                    pass
            return task

        _stdlib.set_result_getter(self, get)

    def _bar(self, total: int | None) -> tuple[Any, bool]:
        return _make_progress(self._progress_arg, total)

    @staticmethod
    def _packed_tasks(job, mapper, batches, state) -> Iterator[tuple]:
        """Tasks of a map-like call; iteration errors end it as in the stdlib."""
        i = -1
        # Every batch of a call has the same function (the stdlib's mapper):
        # decide once whether it goes by reference (5 us a batch otherwise).
        by_reference = None
        try:
            for i, batch in enumerate(batches):
                func, items = batch
                if by_reference is None:
                    by_reference = isinstance(func, _PLAIN_FUNCTIONS) and _callables.by_reference(
                        func, state.main_by_ref
                    )
                # items: atomic values, or tuples/lists of them (starmap).
                if by_reference and _sharing.is_plain(items, 2):
                    # Nothing here can hold shared memory: the stdlib's way.
                    yield _stdlib.task(job, i, _run_direct, (mapper, batch))
                    continue
                try:
                    payload = state.dumps((mapper, (batch,), {}))
                except Exception as e:  # delivered to that task
                    yield _stdlib.task(job, i, _reraise, (e,))
                else:
                    yield _stdlib.task(job, i, _run_packed, (payload,))
        except Exception as e:
            yield _stdlib.failed_task(job, i + 1, e)

    @staticmethod
    def _single_tasks(job, func, iterable, state) -> Iterator[tuple]:
        i = -1
        try:
            for i, x in enumerate(iterable):
                try:
                    payload = state.dumps((func, (x,), {}))
                except Exception as e:
                    yield _stdlib.task(job, i, _reraise, (e,))
                else:
                    yield _stdlib.task(job, i, _run_packed, (payload,))
        except Exception as e:
            yield _stdlib.failed_task(job, i + 1, e)

    @staticmethod
    def _apply_task(job, func, args, kwds, state) -> Iterator[tuple]:
        try:
            payload = state.dumps((func, tuple(args), dict(kwds)))
        except Exception as e:
            yield _stdlib.task(job, 0, _reraise, (e,))
        else:
            yield _stdlib.task(job, 0, _run_packed, (payload,))

    # -- the public surface -------------------------------------------------------

    def apply_async(self, func, args=(), kwds={}, callback=None, error_callback=None):  # noqa: B006
        """Asynchronous ``func(*args, **kwds)``; see ``multiprocessing.pool.Pool``."""
        self._check_running()
        state = _CallState(self._share_threshold, self._main_by_ref)
        result = _ApplyResult(self, callback, error_callback)
        result._track(state, None, False)
        job = _stdlib.job_of(result)
        _stdlib.put_tasks(self, self._apply_task(job, func, args, kwds, state))
        return result

    def _map_async(
        self, func, iterable, mapper, chunksize=None, callback=None, error_callback=None
    ):
        self._check_running()
        if not hasattr(iterable, "__len__"):
            iterable = list(iterable)
        if chunksize is None:
            chunksize, extra = divmod(len(iterable), len(_stdlib.worker_processes(self)) * 4)
            if extra:
                chunksize += 1
        if len(iterable) == 0:
            chunksize = 0
        state = _CallState(self._share_threshold, self._main_by_ref)
        task_batches = _stdlib.get_tasks(func, iterable, chunksize)
        result = _MapResult(self, chunksize, len(iterable), callback, error_callback=error_callback)
        if result.ready():  # an empty iterable
            return result
        result._track(state, *self._bar(len(iterable)))
        job = _stdlib.job_of(result)
        _stdlib.put_tasks(self, self._packed_tasks(job, mapper, task_batches, state))
        return result

    def _imap(self, cls, func, iterable, chunksize):
        self._check_running()
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize!r}")
        total = _len_or_none(iterable)
        state = _CallState(self._share_threshold, self._main_by_ref)
        result = cls(self)
        result._track(state, *self._bar(total))
        job = _stdlib.job_of(result)
        if chunksize == 1:
            tasks = self._single_tasks(job, func, iterable, state)
            _stdlib.put_tasks(self, tasks, result._set_length)
            return result
        result._chunked = True
        batches = _stdlib.get_tasks(func, iterable, chunksize)
        tasks = self._packed_tasks(job, mapstar, batches, state)
        _stdlib.put_tasks(self, tasks, result._set_length)
        return (item for chunk in result for item in chunk)

    def imap(self, func, iterable, chunksize=1):
        """Lazy ``map`` with results in order; see ``multiprocessing.pool.Pool``."""
        return self._imap(_IMapIterator, func, iterable, chunksize)

    def imap_unordered(self, func, iterable, chunksize=1):
        """Lazy ``map`` with results in completion order."""
        return self._imap(_IMapUnorderedIterator, func, iterable, chunksize)

    @classmethod
    def _terminate_pool(
        cls, taskqueue, inqueue, outqueue, pool, change_notifier, worker_handler, *rest
    ):
        # terminate() ends here, and so does a pool never terminated, through
        # the stdlib's finalizer (when it is garbage-collected or at exit).
        # The workers stop before the stdlib's part writes to the queues: one
        # may have died holding a queue lock a moment ago, before the pool
        # noticed, and that write would wait for the lock forever.
        health = _health_of(pool) or _Health()  # none: no worker ever started
        health.terminating = True  # the workers' deaths are not losses
        _stdlib.stop_worker_handler(worker_handler, change_notifier)
        if _stop_workers(pool, gently=health.broken is None):
            _free_dead_workers_locks(_stdlib.queue_locks(outqueue, inqueue))
        super()._terminate_pool(
            taskqueue, inqueue, outqueue, pool, change_notifier, worker_handler, *rest
        )
        _drain_results(_stdlib.reader_of(outqueue))
        try:
            _native.reap()
        except Exception:
            pass

    def join(self) -> None:
        """Waits for the workers to exit (after ``close()`` or ``terminate()``)."""
        state = _stdlib.pool_state(self)
        if self._health.broken is not None and state != TERMINATE:
            # A dead worker may hold the task queue's lock: the others could
            # never receive their stop sentinels.
            if state == RUN:
                raise ValueError("Pool is still running")
            self.terminate()
        super().join()

    @staticmethod
    def _help_stuff_finish(inqueue, task_handler, size):
        # As the stdlib, but never blocks forever on a lock a dead worker held,
        # and drains until the task handler has really stopped.
        _stdlib.drain_task_queue(inqueue, task_handler, lock_timeout=1.0, drain_for=10.0)


def _stop_workers(workers: list, gently: bool) -> bool:
    """Stops the workers and waits for them; true if every one is dead.
    ``gently``: SIGTERM first, as the stdlib's terminate sends (a worker that
    is stopped, or ignores it, gets SIGKILL 5 s later)."""
    for p in workers:
        if p.exitcode is None:
            p.terminate() if gently else p.kill()
    for p in workers:
        p.join(5)
        if p.exitcode is None:
            p.kill()
            p.join(5)
    return all(p.exitcode is not None for p in workers)


def _free_dead_workers_locks(locks: Iterable) -> None:
    """With every worker dead, a lock held now is a dead worker's (an idle
    worker holds the task queue's read lock while it waits; one stopped just
    after it sent a result may hold the results lock), or, for a moment, one
    of our threads' (the task handler's last write to the results queue):
    free the first kind, never the second."""
    for lock in locks:
        if lock is None or _stdlib.held_in_this_process(lock):
            continue  # ours: released in microseconds
        if lock.acquire(False):
            lock.release()  # free
            continue
        try:
            lock.release()
        except ValueError:  # released meanwhile
            pass


def _drain_results(reader) -> None:
    """Results still in the pipe after the workers stopped: open and drop
    them, so the pins of workers that exited normally are consumed."""
    while True:
        try:
            if not reader.poll(0):
                return
            data = reader.recv_bytes()
        except Exception:  # a message cut short by a killed worker
            return
        try:
            task = ForkingPickler.loads(data)
            if isinstance(task, tuple) and len(task) == 3:
                _unpack(task[2])
        except Exception:
            # e.g. a stale handle from a killed worker: the next message
            # may still hold pins of a worker that exited normally.
            continue
