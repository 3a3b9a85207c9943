"""``memshare.Process`` and ``memshare.get_context``: the rest of the drop-in
set, so that code written against ``multiprocessing`` changes one import.

A memshare process is a ``multiprocessing`` process whose target, arguments
and class travel by value when the child could not find them by reference
(see ``_callables``): a target or a ``Process`` subclass defined in a notebook
runs under spawn and forkserver too. Under fork nothing is pickled and it is
the standard library's process.

A memshare context is the standard library's context of that start method
whose ``Process``, ``Pool``, ``Queue``, ``JoinableQueue`` and
``ProcessPoolExecutor`` are memshare's; everything else (``Lock``, ``Event``,
``Pipe``, ``Manager``, ``SimpleQueue``, ...) is the standard library's.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context as mpc
import pickle
from typing import Any

from . import _callables

__all__ = ["Process", "get_context"]


def _rebuild(data: bytes) -> Any:
    cls, state = pickle.loads(data)
    proc = cls.__new__(cls)
    proc.__dict__.update(state)
    return proc


class _Portable:
    """Mixin for ``BaseProcess`` subclasses: the process object (its class,
    target, args and kwargs) pickles with memshare's by-value pickler. Only
    spawn and forkserver pickle it (while starting the child)."""

    def __reduce__(self):
        method = self._start_method or multiprocessing.get_start_method()
        data = _callables.dumps(
            (type(self), self.__dict__), main_by_ref=_callables.main_by_reference(method)
        )
        return (_rebuild, (data,))


class Process(_Portable, multiprocessing.Process):
    """A drop-in ``multiprocessing.Process`` (same arguments, methods and
    attributes) that runs targets defined in ``__main__`` under every start
    method.

    Args:
        group: always None, as in the standard library.
        target: the callable ``run()`` calls. A function, lambda or class
            defined in a notebook, a REPL or ``python -c`` is pickled by value
            for spawn and forkserver children; importable ones by reference.
        name: the process name.
        args: positional arguments of ``target`` (pickled the same way).
        kwargs: keyword arguments of ``target``.
        daemon: the daemon flag.

    It starts with the default start method (``multiprocessing.set_start_method``);
    ``get_context(method).Process`` uses a given one.
    """


class ForkProcess(_Portable, mpc.ForkProcess):
    """:class:`Process` started with fork."""


class SpawnProcess(_Portable, mpc.SpawnProcess):
    """:class:`Process` started with spawn."""


class ForkServerProcess(_Portable, mpc.ForkServerProcess):
    """:class:`Process` started with forkserver."""


class _Context:
    """Mixin for the standard library's concrete contexts: memshare's
    process, pools and queues (imported when called: the pools use this
    module)."""

    def get_context(self, method: str | None = None) -> Any:
        return self if method is None else get_context(method)

    def Pool(
        self,
        processes: int | None = None,
        initializer: Any = None,
        initargs: Any = (),
        maxtasksperchild: int | None = None,
        **kwargs: Any,
    ) -> Any:
        """A :class:`memshare.Pool` of this start method (same arguments)."""
        from ._pool import Pool

        return Pool(processes, initializer, initargs, maxtasksperchild, context=self, **kwargs)

    def ProcessPoolExecutor(self, max_workers: int | None = None, **kwargs: Any) -> Any:
        """A :class:`memshare.ProcessPoolExecutor` of this start method."""
        from ._pool import ProcessPoolExecutor

        return ProcessPoolExecutor(max_workers, mp_context=self, **kwargs)

    def Queue(self, maxsize: int = 0) -> Any:
        """A :class:`memshare.Queue` (shared by every start method)."""
        from ._queue import Queue

        return Queue(maxsize)

    def JoinableQueue(self, maxsize: int = 0) -> Any:
        """A :class:`memshare.JoinableQueue`."""
        from ._queue import JoinableQueue

        return JoinableQueue(maxsize)


class ForkContext(_Context, mpc.ForkContext):
    """The fork context with memshare's process, pools and queues."""

    Process = ForkProcess


class SpawnContext(_Context, mpc.SpawnContext):
    """The spawn context with memshare's process, pools and queues."""

    Process = SpawnProcess


class ForkServerContext(_Context, mpc.ForkServerContext):
    """The forkserver context with memshare's process, pools and queues."""

    Process = ForkServerProcess


_CONTEXTS = {
    "fork": ForkContext(),
    "spawn": SpawnContext(),
    "forkserver": ForkServerContext(),
}


def get_context(method: str | None = None) -> Any:
    """A ``multiprocessing`` context whose ``Process``, ``Pool``, ``Queue``,
    ``JoinableQueue`` and ``ProcessPoolExecutor`` are memshare's.

    Args:
        method: ``"fork"``, ``"spawn"`` or ``"forkserver"``; None for the
            default start method (which this fixes, as
            ``multiprocessing.get_context()`` does when a process starts).

    Returns:
        A subclass of the standard library's context of that method: pass it
        wherever one is expected (``context=``, ``mp_context=``); its other
        members (``Lock``, ``Event``, ``Pipe``, ``Manager``, ...) are the
        standard library's.

    Raises:
        ValueError: for an unknown or unavailable start method.
    """
    if method is None:
        method = multiprocessing.get_start_method()
    try:
        ctx = _CONTEXTS[method]
    except KeyError:
        raise ValueError(f"cannot find context for {method!r}") from None
    ctx._check_available()
    return ctx


def as_memshare_context(ctx: Any) -> Any:
    """The memshare context of the start method of ``ctx`` (a standard
    library context, or None for the default); other objects unchanged."""
    if ctx is None:
        return get_context()
    if isinstance(ctx, _Context) or not isinstance(ctx, mpc.BaseContext):
        return ctx
    return get_context(ctx.get_start_method())
