"""pandas: DataFrames, Series, Index types and the extension arrays in them."""

from __future__ import annotations

import sys
import weakref
from typing import Any

import numpy as np

from ._arrow import _enc_arrow
from ._objects import _enc_object, _enc_pickle5
from ._spec import _REBUILD, Leaf, _rebuild, _require


def _enc_dataframe(df: Any, leaf: Leaf, local: bool) -> tuple:
    mgr = df._mgr
    blocks = [
        (_enc_array(blk.values, leaf, local), np.asarray(blk.mgr_locs.as_array, dtype=np.intp))
        for blk in mgr.blocks
    ]
    return (
        "pd_df",
        type(df),
        blocks,
        _enc_index(df.index, leaf, local),
        _enc_index(df.columns, leaf, local),
        dict(df.attrs),
        df.flags.allows_duplicate_labels,
    )


def _reb_dataframe(spec: tuple) -> Any:
    pd = _require("pandas")
    _, cls, blocks, index, columns, attrs, allows_dup = spec
    arrays = [(_rebuild(node), placement) for node, placement in blocks]
    df = _create_dataframe_from_blocks(arrays, _rebuild(index), _rebuild(columns))
    if cls is not pd.DataFrame:
        df = cls(df, copy=False)
    _pin(df)
    if attrs:
        df.attrs = attrs
    if not allows_dup:
        df = df.set_flags(allows_duplicate_labels=False)
    return df


def _create_dataframe_from_blocks(blocks: list, index: Any, columns: Any) -> Any:
    try:
        from pandas.api.internals import create_dataframe_from_blocks
    except ImportError:  # pandas < 3: the same steps by hand
        pd = sys.modules["pandas"]
        from pandas.core.internals import BlockManager
        from pandas.core.internals.api import make_block

        objs = [make_block(values, placement=placement, ndim=2) for values, placement in blocks]
        mgr = BlockManager(objs, [columns, index])
        return pd.DataFrame._from_mgr(mgr, mgr.axes)
    return create_dataframe_from_blocks(blocks, index=index, columns=columns)


def _enc_series(s: Any, leaf: Leaf, local: bool) -> tuple:
    return (
        "pd_series",
        type(s),
        _enc_array(s._values, leaf, local),
        _enc_index(s.index, leaf, local),
        s.name,
        dict(s.attrs),
        s.flags.allows_duplicate_labels,
    )


def _reb_series(spec: tuple) -> Any:
    _require("pandas")
    _, cls, values, index, name, attrs, allows_dup = spec
    arr = _rebuild(values)
    s = cls(arr, index=_rebuild(index), name=name, dtype=arr.dtype, copy=False)
    _pin(s)
    if attrs:
        s.attrs = attrs
    if not allows_dup:
        s = s.set_flags(allows_duplicate_labels=False)
    return s


class _Anchor:
    """Target of the weak reference that keeps shared blocks 'referenced'."""


_ANCHOR = _Anchor()
_PIN = weakref.ref(_ANCHOR)


def _pin(obj: Any) -> None:
    """Make pandas copy every block of ``obj`` before writing to it.

    Copy-on-Write writes in place only when no other live block shares the
    values (``BlockValuesRefs.has_reference()``). Adding a reference that never
    dies makes every write copy first, so shared memory is never written and a
    read-only buffer never raises "assignment destination is read-only". The
    pin sits in the refs object that all views of the block share, so it also
    covers Series and sub-frames taken from this object later. A block created
    by such a copy has fresh refs, so later writes to it are in place.
    """
    mgr = getattr(obj, "_mgr", None)
    for blk in getattr(mgr, "blocks", ()):
        refs = getattr(blk, "refs", None)
        rb = getattr(refs, "referenced_blocks", None)
        if isinstance(rb, list) and not any(r is _PIN for r in rb):
            rb.append(_PIN)


def _enc_index(idx: Any, leaf: Leaf, local: bool) -> tuple:
    """Encode an Index through pandas' own pickle recipe ``fn(cls, d)``.

    Every array, Index or list of them in ``d`` becomes a node, so the rebuild
    goes through the same code pandas uses for unpickling (which keeps ``freq``,
    names, MultiIndex levels and codes) without copying the data.
    """
    reduced = idx.__reduce__()
    fn, args = reduced[0], reduced[1]
    if len(reduced) > 2 and reduced[2] is not None:
        raise TypeError("unexpected Index pickle state")
    cls, d = args
    return ("pd_index", fn, cls, {k: _enc_value(v, leaf, local) for k, v in d.items()})


def _reb_index(spec: tuple) -> Any:
    _, fn, cls, d = spec
    return fn(cls, {k: _rebuild(v) for k, v in d.items()})


def _enc_value(v: Any, leaf: Leaf, local: bool) -> tuple:
    pd = sys.modules["pandas"]
    if isinstance(v, pd.Index):
        return _enc_index(v, leaf, local)
    if isinstance(v, (np.ndarray, pd.api.extensions.ExtensionArray)):
        return _enc_array(v, leaf, local)
    if isinstance(v, list) and any(
        isinstance(x, (np.ndarray, pd.Index, pd.api.extensions.ExtensionArray)) for x in v
    ):
        return ("list", [_enc_value(x, leaf, local) for x in v])
    return ("lit", v)


def _reb_list(spec: tuple) -> list:
    return [_rebuild(x) for x in spec[1]]


def _reb_lit(spec: tuple) -> Any:
    return spec[1]


def _enc_array(arr: Any, leaf: Leaf, local: bool) -> tuple:
    """Encode a numpy array or pandas ExtensionArray."""
    if isinstance(arr, np.ndarray):
        if arr.dtype.hasobject:
            return _enc_object(arr, leaf, local)
        if arr.dtype.kind in "mM":
            # numpy pickles datetime64/timedelta64 in-band even with protocol
            # 5 (they do not export the buffer protocol); int64 views do not.
            return ("nd_view", leaf(arr.view(np.int64)), arr.dtype)
        return ("nd", leaf(arr))
    from pandas.core.arrays import (
        Categorical,
        IntervalArray,
    )
    from pandas.core.arrays._mixins import NDArrayBackedExtensionArray
    from pandas.core.arrays.masked import BaseMaskedArray

    cls = type(arr)
    if isinstance(arr, Categorical):
        dtype = arr.dtype
        return (
            "pd_cat",
            cls,
            _enc_array(arr._codes, leaf, local),
            _enc_index(dtype.categories, leaf, local),
            dtype.ordered,
        )
    if isinstance(arr, NDArrayBackedExtensionArray):
        # pandas < 3 keeps a DatetimeIndex's freq on its array.
        freq = vars(arr).get("_freq")
        return ("pd_ndb", cls, arr.dtype, _enc_array(arr._ndarray, leaf, local), freq)
    if isinstance(arr, BaseMaskedArray):
        return (
            "pd_masked",
            cls,
            _enc_array(arr._data, leaf, local),
            _enc_array(arr._mask, leaf, local),
        )
    if isinstance(arr, IntervalArray):
        return (
            "pd_interval",
            cls,
            arr.dtype,
            _enc_array(arr._left, leaf, local),
            _enc_array(arr._right, leaf, local),
        )
    pa_array = getattr(arr, "_pa_array", None)
    pa = sys.modules.get("pyarrow")
    if pa is not None and isinstance(pa_array, pa.ChunkedArray):
        return ("pd_arrow", cls, arr.dtype, _enc_arrow(pa_array, leaf))
    return _enc_pickle5(arr, leaf)


def _reb_cat(spec: tuple) -> Any:
    pd = _require("pandas")
    _, cls, codes, categories, ordered = spec
    dtype = pd.CategoricalDtype(categories=_rebuild(categories), ordered=ordered)
    return cls._simple_new(_rebuild(codes), dtype=dtype)


def _reb_ndb(spec: tuple) -> Any:
    _, cls, dtype, values, freq = spec
    out = cls._simple_new(_rebuild(values), dtype=dtype)
    if freq is not None:
        out._freq = freq
    return out


def _reb_masked(spec: tuple) -> Any:
    _, cls, data, mask = spec
    return cls(_rebuild(data), _rebuild(mask), copy=False)


def _reb_interval(spec: tuple) -> Any:
    _, cls, dtype, left, right = spec
    return cls._simple_new(_rebuild(left), _rebuild(right), dtype=dtype)


def _reb_pd_arrow(spec: tuple) -> Any:
    _, cls, dtype, chunked = spec
    values = _rebuild(chunked)
    try:
        return cls(values, dtype=dtype)
    except TypeError:  # ArrowExtensionArray, and pandas < 3 string arrays
        return cls(values)


_REBUILD.update(
    {
        "pd_df": _reb_dataframe,
        "pd_series": _reb_series,
        "pd_index": _reb_index,
        "list": _reb_list,
        "lit": _reb_lit,
        "pd_cat": _reb_cat,
        "pd_ndb": _reb_ndb,
        "pd_masked": _reb_masked,
        "pd_interval": _reb_interval,
        "pd_arrow": _reb_pd_arrow,
    }
)
