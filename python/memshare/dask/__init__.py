"""memshare on Dask distributed: zero-copy between the processes of a host.

``register(client)`` makes a running Dask client and every worker (present
and future) memshare-aware: numpy arrays and pandas/Arrow/polars objects
(also inside lists, tuples and dicts) of at least ``share_threshold`` bytes
travel as memshare handles between processes that share a host's memory
(worker to worker, worker to client, client to worker), and as Dask's own
bytes to everyone else. Tasks allocate large arrays in shared memory, so
their results never need a copy. ``Pool(client)`` is ``multiprocessing.Pool``
on a cluster. Install with ``pip install memshare[dask]``; see docs/dask.md.
"""

from __future__ import annotations

from typing import Any

from .. import _native, _sharing
from ._executor import Executor
from ._identity import memory_identity
from ._plugin import NannyPlugin, WorkerPlugin
from ._pool import AsyncResult, Pool

__all__ = [
    "DEFAULT_SHARE_THRESHOLD",
    "AsyncResult",
    "Executor",
    "NannyPlugin",
    "Pool",
    "WorkerPlugin",
    "memory_identity",
    "register",
]

#: Arrays and frames of at least this many bytes travel by handle: the one
#: ``share_threshold`` default of memshare (1 MiB).
DEFAULT_SHARE_THRESHOLD = _sharing.DEFAULT_SHARE_THRESHOLD


def register(client: Any, *, share_threshold: int = DEFAULT_SHARE_THRESHOLD, direct: bool = True):
    """Makes ``client`` and every worker of its cluster memshare-aware.

    Installs a worker plugin (and a nanny plugin) that Dask also runs in
    workers that join or restart later, and turns memshare on in this
    process. Idempotent: registering again replaces the plugins.

    Args:
        client: a connected ``distributed.Client``.
        share_threshold: arrays and frames of at least this many bytes travel
            by handle, and tasks allocate arrays of this size in shared memory.
        direct: gather and scatter directly between this client and the
            workers (``Client(direct_to_workers=True)``) instead of through the
            scheduler, which passes data on undeserialized and so can only be
            sent bytes.

    Returns:
        ``client``, whose ``get_executor()`` now returns an :class:`Executor`.
    """
    if (
        isinstance(share_threshold, bool)
        or not isinstance(share_threshold, int)
        or share_threshold < 1
    ):
        raise ValueError(f"share_threshold must be a positive int, not {share_threshold!r}")
    from . import _wire

    arena = _native.arena_token()  # the client's arena: its host's processes join it
    _wire.enable(share_threshold)
    client.register_plugin(NannyPlugin(arena))
    client.register_plugin(WorkerPlugin(arena, share_threshold))
    if direct:
        client.direct_to_workers = True
    client._memshare_threshold = share_threshold

    def get_executor(**kwargs: Any) -> Executor:
        return Executor(client, share_threshold=share_threshold, **kwargs)

    client.get_executor = get_executor
    return client
