"""The plugins that make every worker of a cluster memshare-aware.

:class:`WorkerPlugin` runs in each worker, present and future (Dask sends
registered plugins to workers that join later and to workers a nanny
restarts): it joins the host's arena, turns on the handshake and serializers
(:mod:`._wire`), makes tasks allocate large arrays in shared memory, and
drops the lease of a ``get_data`` request when the request ends.
:class:`NannyPlugin` makes a nanny start (and restart) its worker process
inside that arena.
"""

from __future__ import annotations

import contextvars
import functools
import os
from collections.abc import Callable
from typing import Any

import distributed.diagnostics.plugin as dask_plugin

from .. import _allocator, _native
from . import _wire

__all__ = ["NannyPlugin", "WorkerPlugin"]

_ARENA_ENV = "MEMSHARE_ARENA"


def join_arena(token: str | None) -> str:
    """Joins the arena ``token`` if this process has none yet (a token from
    another host's arena cannot be attached: memshare then creates a new one
    there); returns the arena this process uses."""
    if token and os.environ.get(_ARENA_ENV) != token:
        os.environ[_ARENA_ENV] = token
    return _native.arena_token()


def _call_with_hook(threshold: int, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    previous = _allocator._enable(threshold)
    try:
        return fn(*args, **kwargs)
    finally:
        _native.numpy_set_allocator(previous)


def _hooked_submit(submit: Callable, threshold: int, fn: Callable, *args: Any, **kwargs: Any):
    """Executor ``submit`` whose tasks run with numpy's allocator hook on.

    Dask runs a task as ``context.run(task, ...)`` in a copy of the
    scheduling coroutine's context; the hook (a context variable) is switched
    on inside that copy.
    """
    ctx = getattr(fn, "__self__", None)
    if isinstance(ctx, contextvars.Context) and getattr(fn, "__name__", "") == "run":
        return submit(ctx.run, functools.partial(_call_with_hook, threshold, *args[:1]), *args[1:], **kwargs)
    return submit(_call_with_hook, threshold, fn, *args, **kwargs)


class WorkerPlugin(dask_plugin.WorkerPlugin):
    """Makes a Dask worker memshare-aware (see :func:`memshare.dask.register`).

    Args:
        arena: token of the client's arena: workers on the client's host join
            it, so the processes of a host share one arena.
        threshold: arrays and frames of at least this many bytes travel by
            handle and are born in shared memory in tasks.
    """

    name = "memshare"

    def __init__(self, arena: str | None, threshold: int):
        self.arena = arena
        self.threshold = threshold

    def setup(self, worker: Any) -> None:
        join_arena(self.arena)
        _wire.enable(self.threshold)
        for executor in worker.executors.values():
            if "ThreadPoolExecutor" in type(executor).__name__ and not hasattr(
                executor, "_memshare_submit"
            ):
                executor._memshare_submit = executor.submit
                executor.submit = functools.partial(
                    _hooked_submit, executor._memshare_submit, self.threshold
                )
        original = worker.handlers["get_data"]
        if not getattr(original, "_memshare", False):

            async def get_data(comm: Any, *args: Any, **kwargs: Any) -> Any:
                try:
                    return await original(comm, *args, **kwargs)
                finally:
                    _wire.release_lease(comm)

            get_data._memshare = True  # type: ignore[attr-defined]
            worker.handlers["get_data"] = get_data
        # Idle comms were opened before this worker advertised its memory.
        worker.rpc.collect()

    def teardown(self, worker: Any) -> None:
        for executor in worker.executors.values():
            submit = getattr(executor, "_memshare_submit", None)
            if submit is not None:
                executor.submit = submit
                del executor._memshare_submit


class NannyPlugin(dask_plugin.NannyPlugin):
    """Starts (and restarts) a nanny's worker process in the host's arena.

    Args:
        arena: token of the client's arena (joined on the client's host).
    """

    name = "memshare-nanny"
    restart = False

    def __init__(self, arena: str | None):
        self.arena = arena

    def setup(self, nanny: Any) -> None:
        # On another host the client's arena cannot be attached: the nanny's
        # own arena is then the one its worker (and the worker it restarts) uses.
        nanny.env[_ARENA_ENV] = join_arena(self.arena)
