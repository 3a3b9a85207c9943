"""The parent side: pickling the arguments of one call.

:class:`_CallState` decides what of a call's arguments travels by handle
(:meth:`_CallState.reduce_array`, :meth:`_CallState.reduce_frame`) and owns
the pins of the call's messages.
"""

from __future__ import annotations

import io
import pickle
import threading
from typing import Any

import numpy as np

from .. import _callables, _native
from .._array import _block_of, _encode_dtype, _rebuild, _rebuild_private, share_array
from ._config import _count

_FRAME_PACKAGES = frozenset({"pandas", "pyarrow", "polars"})


def _frames():
    try:
        from .. import _frames
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


class _CallState:
    """What one call shares: a memo of shared copies and the owner of its pins.

    Lives as long as the call's result object and its task generator; when it
    goes, the shared copies it made are dropped (workers keep what they
    opened) and pins of tasks that never reached a worker are released.
    """

    __slots__ = ("__weakref__", "arrays", "frames", "lock", "main_by_ref", "owner", "threshold")

    def __init__(self, threshold: int | None, main_by_ref: bool = True):
        self.threshold = threshold
        # Whether the workers can look up our __main__ (_callables).
        self.main_by_ref = main_by_ref
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


class _CallPickler(_callables.Pickler):
    """ForkingPickler's reducers, callables the workers cannot import by value
    (``_callables``), arrays and frames by handle, large ones shared once per
    call."""

    def __init__(self, file: io.BytesIO, state: _CallState):
        super().__init__(file, pickle.HIGHEST_PROTOCOL, main_by_ref=state.main_by_ref)
        self._state = state

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            return self._state.reduce_array(obj)
        if type(obj).__module__.partition(".")[0] in _FRAME_PACKAGES:
            return self._state.reduce_frame(obj)
        if isinstance(obj, _callables.Pickler.CALLABLES):
            return super().reducer_override(obj)
        return NotImplemented
