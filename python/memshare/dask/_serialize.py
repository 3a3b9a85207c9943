"""Every call memshare.dask makes into memshare's pickling, in one place.

A message is one frame: a kind byte, then a memshare message. Pins of the
handles in a message belong to a *lease* (a pin owner): dropping the lease
releases the pins of handles that were never opened, so a transfer that is cut
short leaks nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _native, _sharing
from .._array import SharedArray, share_array

__all__ = ["counters", "dumps", "loads", "new_lease"]

#: Arrays this process copied into shared memory on their way out (for tests
#: and curious users): results born in shared memory never are.
counters = {"shared_on_the_way": 0}

_SHARED = b"S"  # a SharedArray: the caller's shared state, arrives writable and shared
_VIEW = b"R"  # a plain array: arrives as a read-only view of the same memory
_PICKLED = b"P"  # anything else: memshare's pickle (frames, containers)


def new_lease() -> _native.Lease:
    """A pin owner: pins made for it are released when it is dropped."""
    return _sharing.Lease()


def dumps(obj: Any, lease: _native.Lease) -> bytes:
    """One frame that carries ``obj`` by handle (sharing its data once if needed)."""
    if isinstance(obj, np.ndarray):
        kind = _SHARED if isinstance(obj, SharedArray) else _VIEW
        if _sharing.entry_of(obj) is None:
            counters["shared_on_the_way"] += 1
        entry = _sharing.entry_of(share_array(obj))
        if entry is None:  # pragma: no cover - share_array always shares
            raise TypeError("memshare: array could not be shared")
        return kind + _native.encode_message([entry], b"", lease)
    return _PICKLED + _sharing.encode(obj, lease=lease)


def loads(frame: Any) -> Any:
    """Inverse of :func:`dumps`: maps the same memory in this process."""
    data = bytes(frame)
    kind, body = data[:1], data[1:]
    if kind == _VIEW:
        arr = _sharing._rebuild_transported(body).view(np.ndarray)
        arr.flags.writeable = False
        return arr
    if kind == _SHARED:
        return _sharing._rebuild_transported(body)
    if kind == _PICKLED:
        return _sharing.loads(body)
    raise _native.HandleError("memshare.dask: not a memshare frame")
