"""``memshare.share``: put any supported object into shared memory."""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np

from . import _sharing
from ._array import _check_dtype, share_array

T = TypeVar("T")

_PASSTHROUGH = (type(None), bool, int, float, complex, str, bytes, np.generic)


def share(obj: T, readonly: bool = False) -> T:
    """Returns ``obj`` with its data in shared memory (one copy).

    - ``numpy.ndarray`` -> :class:`memshare.SharedArray` (writable shared
      state unless ``readonly=True``);
    - pandas ``DataFrame``/``Series``/``Index``, pyarrow ``Table``/
      ``RecordBatch``/``Array``/``ChunkedArray``, polars ``DataFrame``/
      ``Series`` -> the same type, its buffers in shared memory (a snapshot:
      writes in one process are not seen by others);
    - ``dict``/``list``/``tuple`` -> the same container with members shared;
    - anything else picklable -> an equal object whose pickle-5 out-of-band
      buffers were placed in shared memory.

    Sending the result to another process (``multiprocessing``,
    ``concurrent.futures``, memshare's Pool and Queue) moves handles, not data.
    """
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            _check_dtype(obj.dtype)
        return share_array(obj, readonly=readonly)  # type: ignore[return-value]
    if isinstance(obj, _PASSTHROUGH):
        return obj
    if type(obj) is dict:
        return {k: share(v, readonly) for k, v in obj.items()}  # type: ignore[return-value]
    if type(obj) is list:
        return [share(v, readonly) for v in obj]  # type: ignore[return-value]
    if type(obj) is tuple:
        return tuple(share(v, readonly) for v in obj)  # type: ignore[return-value]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(share(v, readonly) for v in obj))  # type: ignore[return-value]
    shared = _share_frame(obj)
    if shared is not NotImplemented:
        return shared
    # Every pickle-5 out-of-band buffer is copied into shared memory.
    return _sharing.loads(_sharing.dumps(obj, threshold=1))


def _share_frame(obj: Any) -> Any:
    module = type(obj).__module__.split(".")[0]
    if module not in ("pandas", "pyarrow", "polars"):
        return NotImplemented
    try:
        from ._frames import share_frame
    except ImportError:  # pragma: no cover - frames support not built
        return NotImplemented
    return share_frame(obj, share_array)
