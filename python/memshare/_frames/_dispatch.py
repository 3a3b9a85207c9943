"""Which objects are handled, and the entry points that share and reduce them."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from ._arrow import _enc_arrow
from ._pandas import _enc_dataframe, _enc_index, _enc_series
from ._polars import _enc_polars
from ._spec import Leaf, ShareArray, _identity, _package_of, _rebuild


def handled_type(obj: Any) -> bool:
    """Whether :func:`share_frame` handles ``obj`` (pure type check, no import).

    Args:
        obj: any object.

    Returns:
        True for pandas ``DataFrame``/``Series``/``Index``, pyarrow
        ``Table``/``RecordBatch``/``Array``/``ChunkedArray`` and polars
        ``DataFrame``/``Series``.
    """
    pkg = _package_of(obj)
    if pkg == "pandas":
        pd = sys.modules["pandas"]
        return isinstance(obj, (pd.DataFrame, pd.Series, pd.Index))
    if pkg == "pyarrow":
        pa = sys.modules["pyarrow"]
        return isinstance(obj, (pa.Table, pa.RecordBatch, pa.Array, pa.ChunkedArray))
    if pkg == "polars":
        pl = sys.modules["polars"]
        return isinstance(obj, (pl.DataFrame, pl.Series))
    return False


# --------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------


def share_frame(obj: Any, share_array: ShareArray) -> Any:
    """Copy a frame-like object into shared memory.

    Args:
        obj: a pandas ``DataFrame``, ``Series`` or ``Index``; a pyarrow
            ``Table``, ``RecordBatch``, ``Array`` or ``ChunkedArray``; a polars
            ``DataFrame`` or ``Series``.
        share_array: ``share_array(arr, readonly=True)`` copies a numpy array
            into read-only shared memory and returns the shared array (an
            array already in read-only shared memory is returned as is, so
            sharing a shared frame again copies nothing but the encodings of
            ``object`` columns it cannot find in its cache).

    Returns:
        An object of the same type, equal to ``obj``, whose data buffers were
        all produced by ``share_array``; ``NotImplemented`` for other types.
    """
    if not handled_type(obj):
        return NotImplemented

    def leaf(arr: np.ndarray) -> np.ndarray:
        if arr.nbytes == 0:
            return arr
        return share_array(arr, readonly=True)

    return _rebuild(_encode(obj, leaf, local=True))


def reduce_frame(obj: Any) -> Any:
    """Reduce a handled object to ``(rebuild, (spec,))`` for pickling.

    The numpy arrays in the spec are the object's own buffers (views, no copy);
    the pickler's ndarray reducer decides how each travels (by handle when it
    lies in shared memory). Returns ``NotImplemented`` for types this module
    does not handle, so it can serve a ``reducer_override``.
    """
    if not handled_type(obj):
        return NotImplemented
    return (_rebuild, (_encode(obj, _identity, local=False),))


def _encode(obj: Any, leaf: Leaf, local: bool) -> tuple:
    pkg = _package_of(obj)
    if pkg == "pandas":
        pd = sys.modules["pandas"]
        if isinstance(obj, pd.DataFrame):
            return _enc_dataframe(obj, leaf, local)
        if isinstance(obj, pd.Series):
            return _enc_series(obj, leaf, local)
        if isinstance(obj, pd.Index):
            return _enc_index(obj, leaf, local)
    elif pkg == "pyarrow":
        return _enc_arrow(obj, leaf)
    elif pkg == "polars":
        return _enc_polars(obj, leaf)
    raise TypeError(f"memshare cannot share objects of type {type(obj).__name__}")


def nbytes(obj: Any) -> int:
    """The bytes of data an array or a pandas/Arrow/polars object holds, cheaply
    (0 when unknown: an unknown size counts as a small one)."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    try:
        blocks = getattr(getattr(obj, "_mgr", None), "blocks", None)  # pandas DataFrame
        if blocks is not None:
            # memory_usage() builds a Series per column: seconds for a wide frame.
            return sum(int(b.values.nbytes) for b in blocks) + int(obj.index.nbytes)
        size = getattr(obj, "estimated_size", None)  # polars
        if size is not None:
            return int(size())
        usage = getattr(obj, "memory_usage", None)  # pandas Series/Index
        if usage is not None:
            v = usage(deep=False)
            return int(v.sum()) if hasattr(v, "sum") else int(v)
        return int(obj.nbytes)  # pyarrow
    except Exception:
        return 0
