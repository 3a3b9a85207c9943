"""The plugins that make every worker of a cluster memshare-aware.

:class:`WorkerPlugin` runs in each worker, present and future (Dask sends
registered plugins to workers that join later and to workers a nanny
restarts): it joins the host's arena, turns on the handshake and serializers
(:mod:`._wire`), makes tasks allocate large arrays in shared memory, and
gives each ``get_data`` request a lease of its own, dropped when it ends.
:class:`NannyPlugin` makes a nanny start (and restart) its worker process
inside that arena.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

import distributed.diagnostics.plugin as dask_plugin
import distributed.worker as dask_worker

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


_hook: dict[str, Any] = {"threshold": None, "original": None}


def _run_task_with_hook(*args: Any, **kwargs: Any) -> Any:
    """Dask's ``_run_task`` (one task, in an executor thread, inside the
    context Dask copied for it) with numpy's allocator hook switched on. The
    task's temporaries reuse each other's blocks through the worker's cache
    of free blocks, which goes back to the shared heap when the task ends (a
    long-lived worker holds nothing between tasks)."""
    original, threshold = _hook["original"], _hook["threshold"]
    if threshold is None:
        return original(*args, **kwargs)
    previous = _allocator._enable(threshold)
    try:
        return original(*args, **kwargs)
    finally:
        _native.numpy_set_allocator(previous)
        _native.flush_block_cache()


def _install_hook(threshold: int | None) -> None:
    _hook["threshold"] = threshold
    if _hook["original"] is None:
        _hook["original"] = dask_worker._run_task
        dask_worker._run_task = _run_task_with_hook


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
        _install_hook(self.threshold)
        original = worker.handlers["get_data"]
        if not getattr(original, "_memshare", False):

            async def get_data(comm: Any, *args: Any, **kwargs: Any) -> Any:
                token = _wire.request_lease()
                try:
                    return await original(comm, *args, **kwargs)
                except BaseException as e:
                    # Dask logs a failed transfer with its traceback and keeps
                    # the record: the handler's finished frames would hold the
                    # data (and its shared memory) for as long.
                    traceback.clear_frames(e.__traceback__)
                    raise
                finally:
                    _wire.end_request_lease(token)

            get_data._memshare = True  # type: ignore[attr-defined]
            worker.handlers["get_data"] = get_data
        # Idle comms were opened before this worker advertised its memory.
        worker.rpc.collect()

    def teardown(self, worker: Any) -> None:
        _install_hook(None)


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
