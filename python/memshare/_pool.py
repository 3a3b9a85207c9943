"""``memshare.Pool`` and ``memshare.ProcessPoolExecutor``: drop-in process pools
that move large data by handle instead of by copy.

Both are subclasses of the standard library's pools, so scheduling, chunking,
ordering, callbacks and shutdown behave exactly as documented for
``multiprocessing.pool.Pool`` and ``concurrent.futures.ProcessPoolExecutor``.
What changes is how arguments and results travel:

* Arguments of one call (``map``, ``imap``, ``apply_async``, ``submit``, ...)
  are pickled by a pickler that knows shared memory. Arrays already in shared
  memory go as handles. numpy arrays and pandas/Arrow/polars objects of at
  least ``share_threshold`` bytes, wherever they sit in the arguments (tuples,
  dicts, attributes of ``self`` of a bound method), are copied into shared
  memory once per call and then go as handles: the generator of ``(df, i)``
  tuples shares ``df`` once. Workers receive such copies as copy-on-write
  views: writing into an argument changes only that task's copy (as with
  arguments pickled by value), and only the pages written are copied.
* Workers run with numpy's allocator hook on (see ``_allocator``): arrays of
  at least ``share_threshold`` bytes they create are born in shared memory,
  and a result that is (or contains) such an array travels back by handle.
  Large results that are not in shared memory are copied there once.
* Handles of a call are pinned on behalf of that call (an owner block), so a
  task that never reaches a worker (terminate, a dead worker) releases its
  pins when the call ends; memory held by a dead worker is reclaimed at once.

Failures: an exception in a task is re-raised in the parent with the worker's
traceback as its ``__cause__``. A worker that dies (SIGKILL, segfault, the OOM
killer) makes every pending call of a ``Pool`` raise :class:`WorkerLostError`
promptly instead of hanging, and marks the pool broken (a dead worker may have
held the task queue's lock); ``ProcessPoolExecutor`` raises ``BrokenProcessPool``
as the standard library does. Workers ignore SIGINT: on Ctrl-C the parent's
``KeyboardInterrupt`` propagates and terminating the pool stops them.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import functools
import io
import itertools
import multiprocessing.pool
import os
import pickle
import signal
import sys
import threading
import time
import types
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.pool import (
    INIT,
    ApplyResult,
    IMapIterator,
    IMapUnorderedIterator,
    MapResult,
    MaybeEncodingError,
    mapstar,
)
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np

from . import _allocator, _native
from ._array import _block_of, _encode_dtype, _rebuild, _rebuild_private, share_array

__all__ = ["Pool", "ProcessPoolExecutor", "WorkerLostError"]

DEFAULT_SHARE_THRESHOLD = 1 << 20

_FRAME_PACKAGES = frozenset({"pandas", "pyarrow", "polars"})

#: Copies into shared memory made by the pools of this process (for tests and
#: curious users): arguments copied in the parent, results copied in workers.
counters = {"shared_arguments": 0, "shared_results": 0}
_counter_lock = threading.Lock()


def _count(name: str) -> None:
    with _counter_lock:
        counters[name] += 1


class WorkerLostError(BrokenProcessPool):
    """A worker process of a :class:`Pool` died while calls were pending.

    Raised by every call that was pending when it happened, and by new calls:
    the pool is broken (like ``concurrent.futures``' ``BrokenProcessPool``,
    which this subclasses). Create a new pool to go on.
    """


def _check_threshold(threshold: int | None) -> int | None:
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ValueError(f"share_threshold must be a positive int or None, not {threshold!r}")
    return threshold


# --- frames -----------------------------------------------------------------


def _frames():
    try:
        from . import _frames
    except ImportError:  # pragma: no cover - frames support not built
        return None
    return _frames


def _frame_nbytes(obj: Any) -> int:
    try:
        size = getattr(obj, "estimated_size", None)  # polars
        if size is not None:
            return int(size())
        usage = getattr(obj, "memory_usage", None)  # pandas
        if usage is not None:
            v = usage(deep=False)
            return int(v.sum()) if hasattr(v, "sum") else int(v)
        return int(obj.nbytes)  # pyarrow
    except Exception:  # an unknown size is a small one
        return 0


# --- the parent side: pickling the arguments of one call ---------------------


class _CallState:
    """What one call shares: a memo of shared copies and the owner of its pins.

    Lives as long as the call's result object and its task generator; when it
    goes, the shared copies it made are dropped (workers keep what they
    opened) and pins of tasks that never reached a worker are released.
    """

    __slots__ = ("__weakref__", "arrays", "frames", "lock", "owner", "threshold")

    def __init__(self, threshold: int | None):
        self.threshold = threshold
        self.arrays: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self.frames: dict[int, tuple[Any, Any]] = {}
        self.owner: _native.Block | None = None
        self.lock = threading.Lock()

    def owner_block(self) -> _native.Block:
        if self.owner is None:
            self.owner = _native.alloc(1)
        return self.owner

    def dumps(self, obj: Any) -> bytes:
        f = io.BytesIO()
        with self.lock:
            _CallPickler(f, self).dump(obj)
        return f.getvalue()

    def reduce_array(self, arr: np.ndarray) -> Any:
        if arr.dtype.hasobject:
            return NotImplemented
        found = _block_of(arr)
        if found is None:
            if self.threshold is None or arr.nbytes < self.threshold:
                return NotImplemented
            address = arr.__array_interface__["data"][0]
            key = (address, arr.nbytes, arr.shape, arr.strides, arr.dtype.str)
            hit = self.arrays.get(key)
            if hit is None:
                # Writable, but sent as copy-on-write views (below): a task
                # that writes to its argument changes only its own copy, as
                # with arguments pickled by value.
                shared = share_array(arr)
                _count("shared_arguments")
                # Keeping `arr` alive keeps its address from being reused.
                hit = self.arrays[key] = (arr, shared)
            arr = hit[1]
            found = _block_of(arr)
            if found is None:  # pragma: no cover - share_array always shares
                return NotImplemented
            rebuild = _rebuild_private
        else:
            rebuild = _rebuild  # the caller's own shared state stays shared
        block, offset = found
        message = block.array_message(
            _encode_dtype(arr.dtype),
            arr.dtype.itemsize,
            arr.shape,
            arr.strides,
            offset,
            self.owner_block(),
        )
        return (rebuild, (message,))

    def reduce_frame(self, obj: Any) -> Any:
        if self.threshold is None:
            return NotImplemented
        hit = self.frames.get(id(obj))
        if hit is not None:
            return hit[1]
        frames = _frames()
        if frames is None or not frames.handled_type(obj):
            return NotImplemented
        if _frame_nbytes(obj) < self.threshold:
            return NotImplemented
        shared = frames.share_frame(obj, share_array)
        _count("shared_arguments")
        rv = frames.reduce_frame(shared)
        self.frames[id(obj)] = (obj, rv)
        return rv


class _CallPickler(ForkingPickler):
    """ForkingPickler (so every reducer registered there applies) that sends
    arrays and frames by handle, sharing large ones once per call."""

    def __init__(self, file: io.BytesIO, state: _CallState):
        super().__init__(file, pickle.HIGHEST_PROTOCOL)
        self._state = state

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            return self._state.reduce_array(obj)
        if type(obj).__module__.partition(".")[0] in _FRAME_PACKAGES:
            return self._state.reduce_frame(obj)
        return NotImplemented


# --- the worker side ---------------------------------------------------------

_worker_threshold: int | None = None


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
    global _worker_threshold
    _worker_threshold = threshold
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


class _ResultPickler(ForkingPickler):
    """Pickles a worker's result: shared arrays by handle, large private
    arrays copied into shared memory first."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray) and not obj.dtype.hasobject:
            found = _block_of(obj)
            if found is None:
                thr = _worker_threshold
                if thr is None or obj.nbytes < thr:
                    return NotImplemented
                obj = share_array(obj)
                _count("shared_results")
                found = _block_of(obj)
                if found is None:  # pragma: no cover
                    return NotImplemented
            block, offset = found
            message = block.array_message(
                _encode_dtype(obj.dtype), obj.dtype.itemsize, obj.shape, obj.strides, offset
            )
            return (_rebuild, (message,))
        return NotImplemented


class _Packed:
    """A result pickled in the worker, unpickled by the parent's result
    object (so a result that cannot be rebuilt fails its own call only)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data

    def __reduce__(self):
        return (_Packed, (self.data,))

    def load(self) -> Any:
        return pickle.loads(self.data)


_ATOMIC = frozenset({int, float, bool, str, bytes, complex, type(None)})
_PLAIN_FUNCTIONS = (types.FunctionType, types.BuiltinFunctionType)


def _is_plain(value: Any) -> bool:
    """True for values that cannot hold shared memory (atomic, or a list or
    tuple of atomic values): they need no memshare pickling at all."""
    t = type(value)
    if t in _ATOMIC:
        return True
    if t is list or t is tuple:
        return _ATOMIC.issuperset(map(type, value))
    return False


def _run_direct(mapper: Callable, batch: tuple) -> Any:
    """Pool task of plain items for a plain function (the fast path)."""
    return _pack(mapper(batch))


def _run_packed(payload: bytes) -> Any:
    """Pool task: unpickle the call, run it, pickle the result."""
    fn, args, kwds = pickle.loads(payload)
    return _pack(fn(*args, **kwds))


def _pack(value: Any) -> Any:
    if _is_plain(value):
        return value
    f = io.BytesIO()
    try:
        _ResultPickler(f, pickle.HIGHEST_PROTOCOL).dump(value)
    except Exception as e:  # same error as the standard library's
        raise MaybeEncodingError(e, value) from None
    return _Packed(f.getvalue())


def _share_result(obj: Any, depth: int = 0) -> Any:
    """Executor results: large private arrays (in containers too) to shared memory."""
    if isinstance(obj, np.ndarray):
        thr = _worker_threshold
        if (
            thr is not None
            and obj.nbytes >= thr
            and not obj.dtype.hasobject
            and _block_of(obj) is None
        ):
            _count("shared_results")
            return share_array(obj)
        return obj
    if depth < 4:
        t = type(obj)
        if t is list or t is tuple:
            items = [_share_result(v, depth + 1) for v in obj]
            if any(a is not b for a, b in zip(items, obj, strict=False)):
                return t(items)
        elif t is dict:
            new = {k: _share_result(v, depth + 1) for k, v in obj.items()}
            if any(new[k] is not v for k, v in obj.items()):
                return new
    return obj


def _run_plain(payload: bytes) -> Any:
    """Executor task: unpickle the call, run it, share a large result."""
    fn, args, kwds = pickle.loads(payload)
    return _share_result(fn(*args, **kwds))


def _process_chunk(fn: Callable, chunk: list[tuple]) -> list:
    return [fn(*args) for args in chunk]


def _reraise(exc: BaseException) -> Any:
    raise exc


def _unpack(obj: tuple[bool, Any]) -> tuple[bool, Any]:
    success, value = obj
    if success and type(value) is _Packed:
        try:
            return True, value.load()
        except Exception as e:  # delivered to the caller
            return False, e
    return obj


# --- progress bars ------------------------------------------------------------


class _TextProgress:
    """A minimal progress line on stderr when tqdm is not installed."""

    def __init__(self, total: int | None):
        self.total, self.n, self._last = total, 0, 0.0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last > 0.2 or self.n == self.total:
            self._last = now
            total = "?" if self.total is None else self.total
            sys.stderr.write(f"\r{self.n}/{total} tasks")
            sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()


def _make_progress(progress: Any, total: int | None) -> tuple[Any, bool]:
    """(bar, owned): a bar for ``total`` tasks; ``owned`` bars are closed by us."""
    if progress is None or progress is False:
        return None, False
    if progress is True:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return _TextProgress(total), True
        return tqdm(total=total), True
    if hasattr(progress, "update"):
        return progress, False  # a bar the caller made: theirs to close
    if callable(progress):  # a tqdm-like class
        return progress(total=total), True
    raise TypeError("progress must be True, False, a tqdm-like bar or a bar class")


# --- result objects -------------------------------------------------------------


class _Tracked:
    """Mixin: a call's state, progress bar and forced failure."""

    _failed = False
    _state: _CallState | None = None
    _bar: Any = None
    _bar_owned = False

    def _track(self, state: _CallState | None, bar: Any, owned: bool) -> None:
        self._state, self._bar, self._bar_owned = state, bar, owned

    def _progress(self, n: int) -> None:
        if self._bar is not None and n:
            try:
                self._bar.update(n)
            except Exception:  # a broken bar must not break the pool
                self._bar = None

    def _finished(self) -> None:
        self._state = None  # drops the call's shared copies and its pins
        bar, self._bar = self._bar, None
        if bar is not None and self._bar_owned:
            try:
                bar.close()
            except Exception:
                pass

    def _uncache(self) -> None:
        try:
            del self._cache[self._job]
        except KeyError:
            pass


class _ApplyResult(_Tracked, ApplyResult):
    def _set(self, i, obj):
        if self._failed:
            _unpack(obj)  # opens (and drops) its handles: consumes their pins
            return
        super()._set(i, _unpack(obj))
        self._progress(1)
        self._finished()

    def _fail(self, exc: BaseException) -> None:
        if self._failed or self.ready():
            return
        self._failed = True
        self._success, self._value = False, exc
        if self._error_callback:
            self._error_callback(exc)
        self._event.set()
        self._uncache()
        self._pool = None
        self._finished()


class _MapResult(_Tracked, MapResult):
    def _set(self, i, success_result):
        if self._failed:
            _unpack(success_result)
            return
        success, value = _unpack(success_result)
        super()._set(i, (success, value))
        self._progress(len(value) if success else 0)
        if self._pool is None:
            self._finished()

    def _fail(self, exc: BaseException) -> None:
        if self._failed or self.ready():
            return
        self._failed = True
        self._number_left = 0
        if self._success:
            self._success, self._value = False, exc
        if self._error_callback:
            self._error_callback(self._value)
        self._uncache()
        self._event.set()
        self._pool = None
        self._finished()


class _IterMixin(_Tracked):
    _chunked = False

    def __init__(self, pool):
        super().__init__(pool)
        # Reentrant, so the checks below can hold it around the stdlib's code.
        self._cond = threading.Condition(threading.RLock())

    def _set(self, i, obj):
        obj = _unpack(obj)
        with self._cond:
            if self._failed:
                return
            super()._set(i, obj)
        success, value = obj
        self._progress((len(value) if self._chunked else 1) if success else 0)
        if self._pool is None:
            self._finished()

    def _set_length(self, length):
        with self._cond:
            if self._failed:
                return
            super()._set_length(length)
        if self._pool is None:
            self._finished()

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self._failed or self._pool is None:
                return
            self._failed = True
            self._items.append((False, exc))
            # After the error, iteration ends.
            self._length = self._index
            self._cond.notify()
        self._uncache()
        self._pool = None
        self._finished()


class _IMapIterator(_IterMixin, IMapIterator):
    pass


class _IMapUnorderedIterator(_IterMixin, IMapUnorderedIterator):
    pass


# --- worker health --------------------------------------------------------------


class _Health:
    """Shared by a Pool and its worker handler thread (without referencing the
    pool, so an unclosed pool is still garbage-collected as in the stdlib)."""

    def __init__(self) -> None:
        self.cache: dict | None = None
        self.terminating = False
        self.broken: WorkerLostError | None = None


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _worker_exited(health: _Health, proc: Any, code: int) -> None:
    """Called (in the worker handler thread) when a worker exits abnormally."""
    if health.terminating:
        return
    err = WorkerLostError(
        f"a worker process (pid {proc.pid}) {_describe_exit(code)}; the pool is broken "
        "and the calls that were pending failed. Create a new Pool to go on."
    )
    if health.broken is None:
        health.broken = err
    for result in list((health.cache or {}).values()):
        fail = getattr(result, "_fail", None)
        if fail is not None:
            try:
                fail(err)
            except Exception:  # keep failing the others
                pass
    try:
        _native.reap()  # the dead worker's memory, now
    except Exception:
        pass


class _WatchedProcess:
    """A pool worker process that reports an abnormal exit the first time the
    pool's worker handler looks at its exit code."""

    __slots__ = ("_health", "_proc", "_reported")

    def __init__(self, proc: Any, health: _Health):
        object.__setattr__(self, "_proc", proc)
        object.__setattr__(self, "_health", health)
        object.__setattr__(self, "_reported", False)

    @property
    def exitcode(self) -> int | None:
        code = self._proc.exitcode
        if code not in (None, 0) and not self._reported:
            object.__setattr__(self, "_reported", True)
            _worker_exited(self._health, self._proc, code)
        return code

    def __getattr__(self, name: str) -> Any:
        return getattr(self._proc, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._proc, name, value)


def _make_process(health: _Health, ctx: Any, *args: Any, **kwds: Any) -> _WatchedProcess:
    return _WatchedProcess(ctx.Process(*args, **kwds), health)


# --- Pool ---------------------------------------------------------------------------


def _len_or_none(iterable: Any) -> int | None:
    try:
        return len(iterable)
    except TypeError:
        return None


class Pool(multiprocessing.pool.Pool):
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
        self._pool = []
        self._state = INIT
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._share_threshold = _check_threshold(share_threshold)
        self._progress_arg = progress
        self._health = _Health()
        # The stdlib hands `self.Process` to its worker handler thread.
        self.Process = functools.partial(_make_process, self._health)
        super().__init__(
            processes,
            _worker_init,
            (self._share_threshold, _home_token(), initializer, tuple(initargs)),
            maxtasksperchild,
            context,
        )
        self._health.cache = self._cache

    # -- plumbing -------------------------------------------------------------

    def _check_running(self) -> None:
        if self._health.broken is not None:
            raise WorkerLostError(str(self._health.broken))
        super()._check_running()

    def _setup_queues(self) -> None:
        super()._setup_queues()
        reader = self._outqueue._reader

        def get() -> Any:
            data = reader.recv_bytes()
            try:
                return ForkingPickler.loads(data)
            except Exception:  # an unreadable message names no call
                return (None, 0, (False, None))

        self._quick_get = get

    def _bar(self, total: int | None) -> tuple[Any, bool]:
        return _make_progress(self._progress_arg, total)

    @staticmethod
    def _packed_tasks(job, mapper, batches, state) -> Iterator[tuple]:
        """Tasks of a map-like call; iteration errors end it as in the stdlib."""
        i = -1
        try:
            for i, batch in enumerate(batches):
                func, items = batch
                if isinstance(func, _PLAIN_FUNCTIONS) and (
                    _ATOMIC.issuperset(map(type, items))
                    or all(type(x) is tuple and _is_plain(x) for x in items)
                ):
                    # Nothing here can hold shared memory: the stdlib's way.
                    yield (job, i, _run_direct, (mapper, batch), {})
                    continue
                try:
                    payload = state.dumps((mapper, (batch,), {}))
                except Exception as e:  # delivered to that task
                    yield (job, i, _reraise, (e,), {})
                else:
                    yield (job, i, _run_packed, (payload,), {})
        except Exception as e:
            yield (job, i + 1, multiprocessing.pool._helper_reraises_exception, (e,), {})

    @staticmethod
    def _single_tasks(job, func, iterable, state) -> Iterator[tuple]:
        i = -1
        try:
            for i, x in enumerate(iterable):
                try:
                    payload = state.dumps((func, (x,), {}))
                except Exception as e:
                    yield (job, i, _reraise, (e,), {})
                else:
                    yield (job, i, _run_packed, (payload,), {})
        except Exception as e:
            yield (job, i + 1, multiprocessing.pool._helper_reraises_exception, (e,), {})

    @staticmethod
    def _apply_task(job, func, args, kwds, state) -> Iterator[tuple]:
        try:
            payload = state.dumps((func, tuple(args), dict(kwds)))
        except Exception as e:
            yield (job, 0, _reraise, (e,), {})
        else:
            yield (job, 0, _run_packed, (payload,), {})

    # -- the public surface -------------------------------------------------------

    def apply_async(self, func, args=(), kwds={}, callback=None, error_callback=None):  # noqa: B006
        """Asynchronous ``func(*args, **kwds)``; see ``multiprocessing.pool.Pool``."""
        self._check_running()
        state = _CallState(self._share_threshold)
        result = _ApplyResult(self, callback, error_callback)
        result._track(state, None, False)
        self._taskqueue.put((self._apply_task(result._job, func, args, kwds, state), None))
        return result

    def _map_async(
        self, func, iterable, mapper, chunksize=None, callback=None, error_callback=None
    ):
        self._check_running()
        if not hasattr(iterable, "__len__"):
            iterable = list(iterable)
        if chunksize is None:
            chunksize, extra = divmod(len(iterable), len(self._pool) * 4)
            if extra:
                chunksize += 1
        if len(iterable) == 0:
            chunksize = 0
        state = _CallState(self._share_threshold)
        task_batches = multiprocessing.pool.Pool._get_tasks(func, iterable, chunksize)
        result = _MapResult(self, chunksize, len(iterable), callback, error_callback=error_callback)
        if result.ready():  # an empty iterable
            return result
        result._track(state, *self._bar(len(iterable)))
        self._taskqueue.put((self._packed_tasks(result._job, mapper, task_batches, state), None))
        return result

    def _imap(self, cls, func, iterable, chunksize):
        self._check_running()
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize!r}")
        total = _len_or_none(iterable)
        state = _CallState(self._share_threshold)
        result = cls(self)
        result._track(state, *self._bar(total))
        if chunksize == 1:
            tasks = self._single_tasks(result._job, func, iterable, state)
            self._taskqueue.put((tasks, result._set_length))
            return result
        result._chunked = True
        batches = multiprocessing.pool.Pool._get_tasks(func, iterable, chunksize)
        tasks = self._packed_tasks(result._job, mapstar, batches, state)
        self._taskqueue.put((tasks, result._set_length))
        return (item for chunk in result for item in chunk)

    def imap(self, func, iterable, chunksize=1):
        """Lazy ``map`` with results in order; see ``multiprocessing.pool.Pool``."""
        return self._imap(_IMapIterator, func, iterable, chunksize)

    def imap_unordered(self, func, iterable, chunksize=1):
        """Lazy ``map`` with results in completion order."""
        return self._imap(_IMapUnorderedIterator, func, iterable, chunksize)

    def terminate(self) -> None:
        """Stops the workers at once; pending calls never complete."""
        self._health.terminating = True
        if self._health.broken is not None:
            self._unwedge()
        super().terminate()
        self._drain_results()
        try:
            _native.reap()
        except Exception:
            pass

    def _unwedge(self) -> None:
        """A dead worker may have died holding a queue lock (or mid-message):
        stop the workers first, then free the locks nobody alive can hold."""
        self._worker_handler._state = multiprocessing.pool.TERMINATE
        for p in list(self._pool):
            if p.exitcode is None:
                p.kill()
        for p in list(self._pool):
            p.join(5)
        for lock in (self._outqueue._wlock, self._inqueue._rlock):
            if lock is None:
                continue
            # Free now, or held only for a moment by our own threads: leave
            # it. Still held after that: its holder is dead, release it.
            if lock.acquire(timeout=0.5):
                lock.release()
                continue
            try:
                lock.release()
            except ValueError:
                pass

    def _drain_results(self) -> None:
        """Results still in the pipe after the workers stopped: open and drop
        them, so the pins of workers that exited normally are consumed."""
        reader = self._outqueue._reader
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

    def join(self) -> None:
        """Waits for the workers to exit (after ``close()`` or ``terminate()``)."""
        if self._health.broken is not None and self._state != multiprocessing.pool.TERMINATE:
            # A dead worker may hold the task queue's lock: the others could
            # never receive their stop sentinels.
            if self._state == multiprocessing.pool.RUN:
                raise ValueError("Pool is still running")
            self.terminate()
        super().join()

    @staticmethod
    def _help_stuff_finish(inqueue, task_handler, size):
        # As the stdlib, but never blocks forever on a lock a dead worker held,
        # and drains until the task handler has really stopped.
        inqueue._rlock.acquire(timeout=1.0)
        deadline = time.monotonic() + 10.0
        while task_handler.is_alive() and time.monotonic() < deadline:
            try:
                if inqueue._reader.poll(0.02):
                    inqueue._reader.recv_bytes()
            except (OSError, EOFError):
                break


# --- ProcessPoolExecutor ------------------------------------------------------------


def _drop_state(future: concurrent.futures.Future) -> None:
    future._memshare_state = None  # type: ignore[attr-defined]
    if not future.cancelled() and isinstance(future.exception(), BrokenProcessPool):
        try:
            _native.reap()
        except Exception:
            pass


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
            future = super().submit(_run_plain, payload)
        future._memshare_state = state  # type: ignore[attr-defined]
        future.add_done_callback(_drop_state)
        return future

    def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:
        """Schedules ``fn(*args, **kwargs)``; large arguments are shared once."""
        return self._submit_with(_CallState(self._share_threshold), fn, args, kwargs)

    def map(self, fn, *iterables, timeout=None, chunksize=1):
        """``map(fn, *iterables)`` in the workers, results in order; large
        arguments are shared once for the whole call."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end_time = None if timeout is None else timeout + time.monotonic()
        state = _CallState(self._share_threshold)
        fs = [
            self._submit_with(state, _process_chunk, (fn, chunk), {})
            for chunk in _chunks(zip(*iterables, strict=False), chunksize)
        ]

        def result_iterator():
            try:
                fs.reverse()
                while fs:
                    f = fs.pop()
                    try:
                        if end_time is None:
                            chunk = f.result()
                        else:
                            chunk = f.result(end_time - time.monotonic())
                    finally:
                        f.cancel()
                    yield from chunk
            finally:
                for f in fs:
                    f.cancel()

        return result_iterator()


if os.environ.get("MEMSHARE_POOL_DEBUG"):  # pragma: no cover
    multiprocessing.util.log_to_stderr()
