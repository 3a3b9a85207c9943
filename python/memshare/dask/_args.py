"""Large task arguments go to the cluster once per call, not once per task.

The arguments of a task travel inside the task graph, through the scheduler,
pickled by value. :class:`Scatterer` scatters numpy arrays and pandas/Arrow/
polars objects of at least the threshold (at the top of the arguments or
inside tuples, lists and dicts) once per call and puts their futures in their
place: Dask then moves them worker to worker, by handle on one host.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from ._wire import _nbytes

__all__ = ["Scatterer"]

_FRAME_PACKAGES = ("pandas", "pyarrow", "polars")
_MAX_DEPTH = 3


def _is_data(obj: Any) -> bool:
    if isinstance(obj, np.ndarray):
        return not obj.dtype.hasobject
    package = type(obj).__module__.partition(".")[0]
    if package not in _FRAME_PACKAGES or package not in sys.modules:
        return False
    from .. import _frames

    return _frames.handled_type(obj)


class Scatterer:
    """Replaces large data in arguments by futures, scattering each object once.

    Holds the objects it scattered (so their ids stay theirs) and their
    futures (so the cluster keeps the data) until it is dropped.
    """

    def __init__(self, client: Any, threshold: int | None):
        self.client = client
        self.threshold = threshold
        self._memo: dict[int, tuple[Any, Any]] = {}

    def replace(self, obj: Any, depth: int = 0) -> Any:
        """``obj`` with large data swapped for futures (the same object if none)."""
        if self.threshold is None:
            return obj
        if _is_data(obj):
            if _nbytes(obj) < self.threshold:
                return obj
            hit = self._memo.get(id(obj))
            if hit is None:
                future = self.client.scatter(obj, broadcast=True, hash=False)
                hit = self._memo[id(obj)] = (obj, future)
            return hit[1]
        if depth >= _MAX_DEPTH:
            return obj
        t = type(obj)
        if t is tuple or t is list:
            items = [self.replace(v, depth + 1) for v in obj]
            if any(a is not b for a, b in zip(items, obj, strict=True)):
                return t(items)
        elif t is dict:
            new = {k: self.replace(v, depth + 1) for k, v in obj.items()}
            if any(new[k] is not v for k, v in obj.items()):
                return new
        return obj

    def release(self) -> None:
        """Lets the cluster forget what this call scattered."""
        self._memo.clear()
