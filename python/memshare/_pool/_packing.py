"""Results: pickling in the worker (:class:`_ResultPickler` for ``Pool``,
:func:`_executor_result` for the Executor) and unpickling in the parent.

A worker's large private arrays are copied into shared memory once and travel
by handle; arrays already in shared memory go by handle as they are.
"""

from __future__ import annotations

import io
import pickle
import types
from typing import Any

import numpy as np

from .. import _callables, _sharing
from ._config import _count
from ._stdlib import MaybeEncodingError

#: The worker's ``share_threshold`` (set by ``_worker_init``; None: off).
_worker_threshold: int | None = None


def set_worker_threshold(threshold: int | None) -> None:
    """Set the threshold above which this worker shares its results."""
    global _worker_threshold
    _worker_threshold = threshold


class _ResultPickler(_callables.Pickler):
    """Pickles a worker's result: shared arrays by handle, large private
    arrays copied into shared memory first; classes and functions of
    ``__main__`` that the parent cannot look up (those that came by value) by
    value."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            rv, copied = _sharing.reduce_task_result(obj, _worker_threshold)
            if copied:
                _count("shared_results")
            return rv
        if isinstance(obj, _callables.Pickler.CALLABLES):
            if obj.__module__ != "__main__":
                # The stdlib's way: by reference, or a PicklingError that fails
                # the call with MaybeEncodingError (a lambda made by a task of an
                # importable module); by value is for __main__'s (a notebook's).
                return NotImplemented
            return super().reducer_override(obj)
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


_PLAIN_FUNCTIONS = (types.FunctionType, types.BuiltinFunctionType)


def _pack(value: Any) -> Any:
    if _sharing.is_plain(value):
        return value
    f = io.BytesIO()
    try:
        _ResultPickler(f, pickle.HIGHEST_PROTOCOL).dump(value)
    except Exception as e:  # same error as the standard library's
        raise MaybeEncodingError(e, value) from None
    return _Packed(f.getvalue())


def _executor_result(obj: Any) -> Any:
    """An Executor result as the standard library's executor sends it back:
    large private arrays shared; if our ``__main__`` is not the parent's (the
    parent is a notebook), wrapped so that objects of classes that came by
    value go back by value."""
    obj = _share_result(obj)
    if _sharing.is_plain(obj) or _callables.main_is_reimported():
        return obj
    return _callables.by_value(obj)


def _share_result(obj: Any) -> Any:
    """Executor results: large private arrays (in containers too) to shared
    memory (the rule is ``_sharing.share_task_result``)."""
    obj, copies = _sharing.share_task_result(obj, _worker_threshold)
    for _ in range(copies):
        _count("shared_results")
    return obj


def _unpack(obj: tuple[bool, Any]) -> tuple[bool, Any]:
    success, value = obj
    if success and type(value) is _Packed:
        try:
            return True, value.load()
        except Exception as e:  # delivered to the caller
            return False, e
    return obj
