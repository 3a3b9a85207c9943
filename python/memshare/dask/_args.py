"""Large task arguments go to the cluster once per call, not once per task.

The arguments of a task travel inside the task graph, through the scheduler,
pickled by value. :class:`Scatterer` scatters numpy arrays and pandas/Arrow/
polars objects of at least the threshold (at the top of the arguments or
inside tuples, lists and dicts) once per call and puts their futures in their
place: Dask then moves them worker to worker, by handle on one host. Each
goes wrapped in a :class:`SharedArgument` that knows its size, because Dask
measures what it stores with ``sizeof``, which walks a wide DataFrame column by
column (seconds for 5000 columns); tasks get the object itself (:func:`unwrap`).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from dask.sizeof import sizeof

from ._wire import _nbytes

__all__ = ["Scatterer", "SharedArgument", "unwrap"]

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


class SharedArgument:
    """A scattered argument and its size in bytes (see the module docstring)."""

    __slots__ = ("nbytes", "obj")

    def __init__(self, obj: Any, nbytes: int):
        self.obj = obj
        self.nbytes = nbytes

    def __reduce__(self):
        return (SharedArgument, (self.obj, self.nbytes))


@sizeof.register(SharedArgument)
def _sizeof_argument(arg: SharedArgument) -> int:
    return arg.nbytes


def unwrap(obj: Any, depth: int = 0) -> Any:
    """``obj`` with every :class:`SharedArgument` replaced by its object."""
    if type(obj) is SharedArgument:
        return obj.obj
    if depth >= _MAX_DEPTH:
        return obj
    t = type(obj)
    if t is tuple or t is list:
        items = [unwrap(v, depth + 1) for v in obj]
        if any(a is not b for a, b in zip(items, obj, strict=True)):
            return t(items)
    elif t is dict:
        new = {k: unwrap(v, depth + 1) for k, v in obj.items()}
        if any(new[k] is not v for k, v in obj.items()):
            return new
    return obj


def call_unwrapped(fn: Any, args: tuple, kwargs: dict) -> Any:
    """Task: ``fn(*args, **kwargs)`` with scattered arguments unwrapped."""
    return fn(*unwrap(args), **unwrap(kwargs))


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
            hit = self._memo.get(id(obj))
            if hit is not None:
                return hit[1]
            nbytes = _nbytes(obj)
            if nbytes < self.threshold:
                return obj
            if hit is None:
                wrapped = SharedArgument(obj, nbytes)
                future = self.client.scatter(wrapped, broadcast=True, hash=False)
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
