"""``client.get_executor()`` after :func:`memshare.dask.register`."""

from __future__ import annotations

import functools
from typing import Any

from distributed.cfexecutor import ClientExecutor

from .._sharing import DEFAULT_SHARE_THRESHOLD
from ._args import Scatterer, call_unwrapped

__all__ = ["Executor"]


class Executor(ClientExecutor):
    """Dask's ``concurrent.futures`` executor whose large arguments are
    scattered once per ``submit``/``map`` call (then moved by handle) instead
    of travelling by value inside the task graph.

    Args:
        client: the ``distributed.Client``.
        share_threshold: arrays and frames of at least this many bytes are
            scattered; ``None`` sends everything by value, as Dask does.
        **kwargs: as for ``Client.get_executor`` (``workers``, ``retries``, ...).
    """

    def __init__(
        self, client: Any, share_threshold: int | None = DEFAULT_SHARE_THRESHOLD, **kwargs: Any
    ):
        super().__init__(client, **kwargs)
        self._share_threshold = share_threshold

    def submit(self, fn, *args, **kwargs):
        """Schedules ``fn(*args, **kwargs)``; returns a ``concurrent.futures.Future``."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        scatter = Scatterer(self._client, self._share_threshold)
        future = super().submit(call_unwrapped, fn, scatter.replace(args), scatter.replace(kwargs))
        # The task holds the scattered data from now on.
        scatter.release()
        return future

    def map(self, fn, *iterables, **kwargs):
        """``map(fn, *iterables)`` on the cluster, results in order; large
        arguments repeated across calls are scattered once."""
        scatter = Scatterer(self._client, self._share_threshold)
        columns = [[scatter.replace(x) for x in it] for it in iterables]
        results = super().map(functools.partial(_star_unwrapped, fn), *columns, **kwargs)
        scatter.release()
        return results


def _star_unwrapped(fn, *args):
    return call_unwrapped(fn, args, {})
