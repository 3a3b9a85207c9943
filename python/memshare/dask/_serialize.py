"""Every call memshare.dask makes into memshare's pickling, in one place.

A message is one frame: a kind byte, then a memshare message. Pins of the
handles in a message belong to a *lease* (a pin owner): dropping the lease
releases the pins of handles that were never opened, so a transfer that is cut
short leaks nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _native
from .._array import SharedArray, _array_message, _block_of, _rebuild, share_array
from .._array import dumps as _dumps
from .._array import loads as _loads

__all__ = ["counters", "dumps", "loads", "new_lease"]

#: Arrays this process copied into shared memory on their way out (for tests
#: and curious users): results born in shared memory never are.
counters = {"shared_on_the_way": 0}

_SHARED = b"S"  # a SharedArray: the caller's shared state, arrives writable and shared
_VIEW = b"R"  # a plain array: arrives as a read-only view of the same memory
_PICKLED = b"P"  # anything else: memshare's pickle (frames, containers)


def new_lease() -> _native.Block:
    """A pin owner: pins made for it are released when it is dropped."""
    return _native.alloc(1)


def dumps(obj: Any, lease: _native.Block) -> bytes:
    """One frame that carries ``obj`` by handle (sharing its data once if needed)."""
    if isinstance(obj, np.ndarray):
        kind = _SHARED if isinstance(obj, SharedArray) else _VIEW
        if _block_of(obj) is None:
            counters["shared_on_the_way"] += 1
        message = _array_message(share_array(obj), lease)
        if message is None:  # pragma: no cover - share_array always shares
            raise TypeError("memshare: array could not be shared")
        return kind + message
    return _PICKLED + _dumps(obj, pin_owner=lease)


def loads(frame: Any) -> Any:
    """Inverse of :func:`dumps`: maps the same memory in this process."""
    data = bytes(frame)
    kind, body = data[:1], data[1:]
    if kind == _VIEW:
        arr = _rebuild(body).view(np.ndarray)
        arr.flags.writeable = False
        return arr
    if kind == _SHARED:
        return _rebuild(body)
    if kind == _PICKLED:
        return _loads(body)
    raise _native.HandleError("memshare.dask: not a memshare frame")
