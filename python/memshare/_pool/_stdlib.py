"""The one place where memshare touches CPython's private multiprocessing names.

memshare's ``Pool`` is a subclass of ``multiprocessing.pool.Pool``: it reuses
the stdlib's scheduling, chunking and shutdown, and so depends on attributes
and hooks that the stdlib does not document (``_taskqueue``, ``_cache``,
``_outqueue._reader``, ``ApplyResult._set`` ...). Every such access is a
function or a name here, so that a change in a new CPython version breaks
this module (and :func:`self_check`) only.

This module imports only the standard library: ``python -I _stdlib.py`` runs
:func:`self_check` on any interpreter without memshare being installed (the
tests do that for every supported CPython version).
"""

from __future__ import annotations

import gc
import inspect
import multiprocessing
import multiprocessing.pool as _mp_pool
import multiprocessing.queues as _mp_queues
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from multiprocessing.pool import (
    INIT,
    RUN,
    TERMINATE,
    ApplyResult,
    IMapIterator,
    IMapUnorderedIterator,
    MapResult,
    MaybeEncodingError,
    mapstar,
)
from multiprocessing.reduction import ForkingPickler
from typing import Any

__all__ = [
    "INIT",
    "OVERRIDDEN_HOOKS",
    "READ_LOCK_PATIENCE",
    "RUN",
    "TERMINATE",
    "ApplyResult",
    "IMapIterator",
    "IMapUnorderedIterator",
    "MapResult",
    "MaybeEncodingError",
    "StdPool",
    "TaskQueue",
    "detach_result",
    "drain_task_queue",
    "end_iterator_with",
    "fail_apply_result",
    "fail_map_result",
    "failed_task",
    "get_tasks",
    "held_in_this_process",
    "is_released",
    "iterator_condition",
    "job_of",
    "make_iterator_reentrant",
    "mapstar",
    "pool_state",
    "prepare_pool",
    "put_tasks",
    "queue_locks",
    "reader_of",
    "result_cache",
    "result_reader",
    "self_check",
    "set_process_factory",
    "set_result_getter",
    "set_task_queue",
    "stop_worker_handler",
    "task",
    "wait_until_released",
    "worker_handler_sentinels",
    "worker_processes",
]

StdPool = _mp_pool.Pool

#: Private stdlib methods that memshare's subclasses override, with the
#: parameters the stdlib calls them with (checked by :func:`self_check`).
OVERRIDDEN_HOOKS: tuple[tuple[type, str, tuple[str, ...]], ...] = (
    (StdPool, "_setup_queues", ("self",)),
    (StdPool, "_check_running", ("self",)),
    (StdPool, "_get_sentinels", ("self",)),
    (
        StdPool,
        "_map_async",
        ("self", "func", "iterable", "mapper", "chunksize", "callback", "error_callback"),
    ),
    (StdPool, "_help_stuff_finish", ("inqueue", "task_handler", "size")),
    (
        StdPool,
        "_terminate_pool",
        (
            "cls",
            "taskqueue",
            "inqueue",
            "outqueue",
            "pool",
            "change_notifier",
            "worker_handler",
            "task_handler",
            "result_handler",
            "cache",
        ),
    ),
    (ApplyResult, "_set", ("self", "i", "obj")),
    (MapResult, "_set", ("self", "i", "success_result")),
    (IMapIterator, "_set", ("self", "i", "obj")),
    (IMapIterator, "_set_length", ("self", "length")),
    (IMapUnorderedIterator, "_set", ("self", "i", "obj")),
)


# --- the pool ----------------------------------------------------------------


def prepare_pool(pool: StdPool) -> None:
    """What ``Pool.__init__`` sets first, so that ``__del__`` and
    ``terminate`` work on a pool whose ``__init__`` failed early."""
    pool._pool = []
    pool._state = INIT


def set_process_factory(pool: StdPool, factory: Callable[..., Any]) -> None:
    """``factory(ctx, *args, **kwds)`` makes the pool's worker processes (the
    stdlib hands ``pool.Process`` to its worker handler thread)."""
    pool.Process = factory


def pool_state(pool: StdPool) -> str:
    """``RUN``, ``CLOSE`` or ``TERMINATE``."""
    return pool._state


def result_cache(pool: StdPool) -> dict:
    """The pool's pending calls: job id -> result object."""
    return pool._cache


def worker_processes(pool: StdPool) -> list:
    """The pool's current worker process objects."""
    return list(pool._pool)


def worker_handler_sentinels(pool: StdPool) -> list:
    """What the worker handler thread waits on besides the workers (the
    return value of ``_get_sentinels``): the pool's change notifier, which
    ``close``, ``terminate`` and an emptied cache signal. The stdlib adds the
    results pipe, which is readable whenever a result waits to be read: the
    thread then loops through ``_maintain_pool`` until the result handler has
    read it, and takes the GIL each time."""
    return [pool._change_notifier._reader]


def result_reader(pool: StdPool) -> Any:
    """The parent's end of the results pipe (a ``Connection``)."""
    return reader_of(pool._outqueue)


def reader_of(queue: Any) -> Any:
    """The reading end of a pool's queue (a ``SimpleQueue``), a ``Connection``."""
    return queue._reader


def set_result_getter(pool: StdPool, get: Callable[[], Any]) -> None:
    """Make the result handler thread receive results with ``get()``; call
    from ``_setup_queues`` after the stdlib's own."""
    pool._quick_get = get


#: Seconds a pool worker that holds something waits for the task queue's read
#: lock before it lets go of what it holds (:class:`TaskQueue`).
READ_LOCK_PATIENCE = 0.01


class TaskQueue(_mp_queues.SimpleQueue):
    """A pool's task queue whose ``get`` (in a worker) calls ``let_go()``
    before it waits, for the read lock (held longer than
    ``READ_LOCK_PATIENCE``: another worker waits for the next task) or for a
    task, if ``holding()`` says the worker holds something.
    It looks under the read lock, so a worker never waits holding it; a
    worker that holds nothing takes the stdlib's path."""

    def __init__(self, *, ctx: Any, holding: Callable[[], bool], let_go: Callable[[], None]):
        super().__init__(ctx=ctx)
        self._holding, self._let_go = holding, let_go

    def __getstate__(self):
        return (super().__getstate__(), self._holding, self._let_go)

    def __setstate__(self, state):
        base, self._holding, self._let_go = state
        super().__setstate__(base)

    def get(self):
        if not self._holding():
            return super().get()
        # Another worker holds the read lock for a few microseconds while it
        # takes a task, or for as long as it waits for one; only the second
        # is this worker's wait. (Letting go at the first made a worker reopen
        # a call's frame and refault its blocks in the middle of the call.)
        if not self._rlock.acquire(timeout=READ_LOCK_PATIENCE):
            self._let_go()
            self._rlock.acquire()
        try:
            if not self._reader.poll(0):
                self._let_go()
            res = self._reader.recv_bytes()
        finally:
            self._rlock.release()
        return ForkingPickler.loads(res)


def set_task_queue(pool: StdPool, holding: Callable[[], bool], let_go: Callable[[], None]) -> None:
    """Give the pool a :class:`TaskQueue` (call from ``_setup_queues`` after
    the stdlib's own, before any worker starts)."""
    pool._inqueue.close()
    pool._inqueue = TaskQueue(ctx=pool._ctx, holding=holding, let_go=let_go)
    pool._quick_put = pool._inqueue._writer.send


def queue_locks(outqueue: Any, inqueue: Any) -> tuple[Any, Any]:
    """The results queue's write lock and the task queue's read lock (either
    may be ``None``): the locks a worker holds while it talks to the pool."""
    return outqueue._wlock, inqueue._rlock


def held_in_this_process(lock: Any) -> bool:
    """True if a thread of this process holds ``lock`` (a
    ``multiprocessing.Lock``), false if it is free or another process holds it."""
    return lock._semlock._count() > 0


def stop_worker_handler(
    handler: threading.Thread, change_notifier: Any, timeout: float = 5.0
) -> None:
    """Stop a pool's worker handler thread from starting new workers, and wait
    for it (at most ``timeout`` seconds), so that the list of workers is final
    (the arguments are those of ``_terminate_pool``)."""
    handler._state = TERMINATE
    change_notifier.put(None)  # wakes it, as the stdlib's terminate does
    if threading.current_thread() is not handler:
        handler.join(timeout)


def drain_task_queue(
    inqueue: Any, task_handler: threading.Thread, lock_timeout: float, drain_for: float
) -> None:
    """``Pool._help_stuff_finish`` with bounds: it never blocks forever on a
    lock a dead worker held, and drains until the task handler has stopped
    (at most ``drain_for`` seconds)."""
    inqueue._rlock.acquire(timeout=lock_timeout)
    reader = inqueue._reader
    deadline = time.monotonic() + drain_for
    while task_handler.is_alive() and time.monotonic() < deadline:
        # Bytes, not messages, and never a blocking read: a worker killed
        # between a task's length and its body left the pipe between two
        # messages, and reading one would wait for bytes that never come.
        # (Readable, and every other reader is dead: os.read returns at once.)
        try:
            if reader.poll(0.02) and not os.read(reader.fileno(), 1 << 16):
                break  # every writer closed its end
        except (OSError, EOFError):
            break


# --- tasks -------------------------------------------------------------------

#: ``get_tasks(func, iterable, size)`` yields ``(func, chunk)`` batches.
get_tasks = StdPool._get_tasks


def task(job: int, i: int, func: Callable, args: tuple, kwds: dict | None = None) -> tuple:
    """The stdlib's task tuple: the worker calls ``func(*args, **kwds)`` and
    sends the outcome back for item ``i`` of call ``job``."""
    return (job, i, func, args, {} if kwds is None else kwds)


def failed_task(job: int, i: int, exc: BaseException) -> tuple:
    """A task that raises ``exc`` in the worker, unwrapped (the stdlib's way
    of reporting an error raised by the task iterator)."""
    return (job, i, _mp_pool._helper_reraises_exception, (exc,), {})


def put_tasks(
    pool: StdPool, tasks: Iterator[tuple], set_length: Callable[[int], None] | None = None
) -> None:
    """Queue a call's tasks; ``set_length(n)`` is called once all were sent."""
    pool._taskqueue.put((tasks, set_length))


# --- result objects ----------------------------------------------------------


def job_of(result: Any) -> int:
    """The job id of a result object (its key in the pool's cache)."""
    return result._job


def is_released(result: Any) -> bool:
    """True once the result object has dropped its pool: the call is over."""
    return result._pool is None


def wait_until_released(result: Any, timeout: float) -> bool:
    """Waits (at most ``timeout`` seconds) until ``result`` has dropped its
    pool; false if it has not. Its waiters wake a moment before: until then a
    pool the program dropped is still held."""
    deadline = time.monotonic() + timeout
    while not is_released(result):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _uncache(result: Any) -> None:
    try:
        del result._cache[result._job]
    except KeyError:
        pass


def detach_result(result: Any) -> None:
    """Remove a result object from its pool's cache and drop the pool."""
    _uncache(result)
    result._pool = None


def fail_apply_result(result: ApplyResult, exc: BaseException) -> None:
    """End an ``apply_async`` call with ``exc`` (callback, waiters, cache)."""
    result._success, result._value = False, exc
    if result._error_callback:
        result._error_callback(exc)
    result._event.set()
    detach_result(result)


def fail_map_result(result: MapResult, exc: BaseException) -> None:
    """End a ``map_async`` call with ``exc``, unless a task already failed."""
    result._number_left = 0
    if result._success:
        result._success, result._value = False, exc
    if result._error_callback:
        result._error_callback(result._value)
    _uncache(result)
    result._event.set()
    result._pool = None


def make_iterator_reentrant(it: IMapIterator) -> None:
    """Give an ``imap`` iterator a reentrant lock, so that a subclass can hold
    it around the stdlib's own locked code."""
    it._cond = threading.Condition(threading.RLock())


def iterator_condition(it: IMapIterator) -> threading.Condition:
    """The condition that guards an ``imap`` iterator's items."""
    return it._cond


def end_iterator_with(it: IMapIterator, exc: BaseException) -> None:
    """Make ``exc`` the iterator's next item and its end (hold its condition)."""
    it._items.append((False, exc))
    it._length = it._index
    it._cond.notify()


# --- self check --------------------------------------------------------------


def self_check() -> None:
    """Check that the names above exist and behave as memshare expects on this
    interpreter (with a real fork pool). Raises AssertionError if not."""
    for cls, name, params in OVERRIDDEN_HOOKS:
        fn = inspect.getattr_static(cls, name, None)
        assert fn is not None, f"{cls.__name__}.{name} is gone"
        fn = getattr(fn, "__func__", fn)
        got = tuple(inspect.signature(fn).parameters)
        assert got == params, f"{cls.__name__}.{name}{got}, expected {params}"
    assert callable(_mp_pool._helper_reraises_exception)
    assert list(get_tasks(abs, [-1, -2, -3], 2)) == [(abs, (-1, -2)), (abs, (-3,))]
    assert mapstar((abs, (-4, 5))) == [4, 5]

    ctx = multiprocessing.get_context("fork")
    pool = ctx.Pool(1)
    try:
        assert pool_state(pool) == RUN
        assert len(worker_processes(pool)) == 1
        assert isinstance(result_cache(pool), dict)
        reader = result_reader(pool)
        assert callable(reader.recv_bytes) and callable(reader.poll)
        assert reader_of(pool._outqueue) is reader
        for lock in queue_locks(pool._outqueue, pool._inqueue):
            assert lock is None or (callable(lock.acquire) and callable(lock.release))
        probe = ctx.Lock()  # the pool's read lock is its idle worker's
        assert not held_in_this_process(probe)
        assert probe.acquire(timeout=60) and held_in_this_process(probe)
        probe.release()
        assert not held_in_this_process(probe)

        ok = ApplyResult(pool, None, None)
        assert result_cache(pool)[job_of(ok)] is ok
        put_tasks(pool, iter([task(job_of(ok), 0, abs, (-5,))]))
        assert ok.get(timeout=60) == 5

        raised = ApplyResult(pool, None, None)
        put_tasks(pool, iter([failed_task(job_of(raised), 0, KeyError("k"))]))
        try:
            raised.get(timeout=60)
        except KeyError:
            pass
        else:
            raise AssertionError("failed_task did not raise")

        exc = ValueError("failed")
        seen: list = []
        applied = ApplyResult(pool, None, seen.append)
        fail_apply_result(applied, exc)
        assert applied.ready() and not applied.successful() and seen == [exc]
        assert is_released(applied) and job_of(applied) not in result_cache(pool)

        mapped = MapResult(pool, 1, 2, None, seen.append)
        fail_map_result(mapped, exc)
        assert mapped.ready() and not mapped.successful() and seen == [exc, exc]
        assert job_of(mapped) not in result_cache(pool)

        it = IMapIterator(pool)
        make_iterator_reentrant(it)
        with iterator_condition(it), iterator_condition(it):  # reentrant
            end_iterator_with(it, exc)
        detach_result(it)
        try:
            it.next(timeout=60)
        except ValueError as e:
            assert e is exc
        else:
            raise AssertionError("the iterator did not end with the error")
        try:
            it.next(timeout=60)
        except StopIteration:
            pass
        else:
            raise AssertionError("the iterator did not stop after the error")
    finally:
        pool.terminate()
        pool.join()
    # The result handler thread releases a result just after its waiters wake.
    assert is_released(ok) and job_of(ok) not in result_cache(pool)

    hooked = _HookedPool(1, context=ctx)
    try:
        assert isinstance(hooked._inqueue, TaskQueue)
        assert hooked._get_sentinels() == [hooked._change_notifier._reader]
        assert hooked.apply(abs, (-6,)) == 6
    finally:
        hooked.terminate()
        hooked.join()
    assert _HookedPool.terminated == [1]
    # A pool never terminated ends through the same hook, by its finalizer.
    dropped = _HookedPool(1, context=ctx)
    last = dropped.apply_async(abs, (-7,))
    assert last.get(timeout=60) == 7 and wait_until_released(last, 60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # "unclosed running pool"
        del dropped, last
        gc.collect()
    assert _HookedPool.terminated == [1, 1]

    stopped = ctx.Pool(1)
    stop_worker_handler(stopped._worker_handler, stopped._change_notifier)
    assert not stopped._worker_handler.is_alive()
    stopped.terminate()
    stopped.join()
    assert pool_state(stopped) == TERMINATE

    queue = ctx.SimpleQueue()
    idle = threading.Thread(target=lambda: None)
    idle.start()
    idle.join()
    drain_task_queue(queue, idle, lock_timeout=5.0, drain_for=5.0)
    assert not queue._rlock.acquire(False), "drain_task_queue must keep the read lock"
    queue._rlock.release()
    queue.close()


def _holding() -> bool:
    return True


def _let_go() -> None:
    pass


class _HookedPool(StdPool):
    terminated: list = []  # the worker count of every pool that ended

    @classmethod
    def _terminate_pool(cls, taskqueue, inqueue, outqueue, pool, *rest):
        cls.terminated.append(len(pool))
        super()._terminate_pool(taskqueue, inqueue, outqueue, pool, *rest)

    def _setup_queues(self) -> None:
        super()._setup_queues()
        set_task_queue(self, _holding, _let_go)

    def _get_sentinels(self) -> list:
        return worker_handler_sentinels(self)


if __name__ == "__main__":
    self_check()
    print("memshare stdlib adapter: ok")
