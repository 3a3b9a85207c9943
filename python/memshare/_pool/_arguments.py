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

from .. import _callables, _native, _sharing
from .._array import share_array
from ._config import _count

_FRAME_PACKAGES = frozenset({"pandas", "pyarrow", "polars"})


def _frames():
    try:
        from .. import _frames
    except ImportError:  # pragma: no cover - frames support not built
        return None
    return _frames


class _CallState:
    """What one call shares: a memo of what it sent (shared copies, and the
    messages of arrays every task receives) and the Lease that owns the pins
    of its messages.

    Lives as long as the call's result object and its task generator; when it
    goes, the shared copies it made are dropped (workers keep what they
    opened) and the lease ends, releasing the pins of tasks that never
    reached a worker.
    """

    __slots__ = ("__weakref__", "arrays", "frames", "lock", "main_by_ref", "owner", "threshold")

    def __init__(self, threshold: int | None, main_by_ref: bool = True):
        self.threshold = threshold
        # Whether the workers can look up our __main__ (_callables).
        self.main_by_ref = main_by_ref
        self.arrays = _sharing.CallMemo()
        self.frames: dict[int, tuple[Any, Any]] = {}
        self.owner: _native.Lease | None = None
        self.lock = threading.Lock()

    def lease(self) -> _native.Lease:
        """The owner of this call's pins (made on first use)."""
        if self.owner is None:
            self.owner = _native.Lease()
        return self.owner

    def dumps(self, obj: Any) -> bytes:
        f = io.BytesIO()
        with self.lock:
            _CallPickler(f, self).dump(obj)
        return f.getvalue()

    def reduce_array(self, arr: np.ndarray) -> Any:
        """The rule is ``_sharing``'s; this call supplies its memo and lease."""
        rv, copied = _sharing.reduce_call_argument(arr, self.arrays, self.threshold, self.lease())
        if copied:
            _count("shared_arguments")
        return rv

    def _share_owned(self, arr: np.ndarray, readonly: bool = False) -> np.ndarray:
        """``share_array`` for the frames this call shares: a copy it makes is
        the call's own (it keeps the frame until it ends), so its first
        message may be kept too (``CallMemo.own``)."""
        shared = share_array(arr, readonly=readonly)
        if _native.data_address(shared) != _native.data_address(arr):
            self.arrays.own(shared)
        return shared

    def reduce_frame(self, obj: Any) -> Any:
        if self.threshold is None:
            return NotImplemented
        hit = self.frames.get(id(obj))
        if hit is not None:
            return hit[1]
        frames = _frames()
        if frames is None or not frames.handled_type(obj):
            return NotImplemented
        if frames.nbytes(obj) < self.threshold:
            return NotImplemented
        shared = frames.share_frame(obj, self._share_owned)
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
