"""pandas, pyarrow and polars objects in shared memory.

Every supported object is taken apart into a *spec*: nested tuples of small
metadata (dtypes, names, placements) and numpy arrays, one array per data
buffer. The same kind of object is then rebuilt over those arrays without
copying them.

* :func:`share_frame` maps every array of the spec through ``share_array``
  (one copy into shared memory) and rebuilds the object locally, so the result
  is an object of the same type whose buffers all live in shared memory.
* The reducers installed by :func:`register_reducers` pickle an object as
  ``(_rebuild, (spec,))``. The arrays in the spec lie in shared memory, so the
  core's ndarray reducer pickles each of them as a small handle, and the
  receiver rebuilds the object over the same memory (zero-copy).

What is *not* a numpy buffer:

* Strings in ``object`` columns (and pandas' python-backed ``string`` dtype)
  are stored as Arrow ``large_string`` buffers (int64 offsets, UTF-8 data,
  validity bitmap) and turned back into Python ``str`` objects on rebuild.
* ``object`` columns holding anything other than strings and one kind of
  missing value are pickled in-band with the spec (a documented exception).
* Extension arrays this module does not know are pickled with protocol 5;
  their out-of-band buffers become arrays of the spec, the in-band rest travels
  with the spec.

pandas frames rebuilt here are *snapshots*: every block is marked as
referenced, so pandas' Copy-on-Write copies a block (for a single-cell write,
just that column) before any write instead of writing into shared memory. The
arrays are handed to ``share_array`` with ``readonly=True``, so code that
bypasses pandas fails loudly instead of changing what other processes see.

pandas, pyarrow and polars are optional: nothing here imports them unless an
object of theirs is being handled.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import pickle
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "handled_type",
    "install",
    "reduce_frame",
    "register_reducers",
    "register_reducers_on_import",
    "share_frame",
]

# Packages whose objects this module handles.
_PACKAGES = ("pandas", "pyarrow", "polars")

ShareArray = Callable[..., np.ndarray]
Leaf = Callable[[np.ndarray], np.ndarray]


def _require(name: str) -> Any:
    """Import an optional dependency or raise an ImportError naming it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            f"memshare needs the optional package '{name}' for this object; "
            f"install it with `pip install {name}`"
        ) from exc


def _package_of(obj: Any) -> str | None:
    """The handled package an object's type comes from, without importing it."""
    top = type(obj).__module__.partition(".")[0]
    if top in _PACKAGES and sys.modules.get(top) is not None:
        return top
    return None


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


def _reducer(obj: Any) -> Any:
    """A dispatch-table reducer: :func:`reduce_frame`, else the default."""
    try:
        return (_rebuild, (_encode(obj, _identity, local=False),))
    except Exception:
        return obj.__reduce_ex__(4)


def _reduce_arrow_buffer(buf: Any) -> Any:
    """Pickle a ``pyarrow.Buffer`` as a numpy view of its memory.

    The core's ndarray reducer then sends it by handle when the memory is
    shared; otherwise it is pickled like any other array.
    """
    if not buf.is_cpu:
        return buf.__reduce_ex__(4)
    return (_py_buffer, (np.frombuffer(buf, dtype=np.uint8),))


def _py_buffer(arr: np.ndarray) -> Any:
    return _require("pyarrow").py_buffer(arr)


def register_reducers(register: Callable[[type, Callable[[Any], Any]], None]) -> list[str]:
    """Register pickling reducers for the handled types of imported packages.

    Only packages already imported are handled (importing pandas just to
    register a reducer would slow down ``import memshare``); see
    :func:`register_reducers_on_import` for the others. Idempotent.

    Args:
        register: ``register(type, reduce_fn)``, e.g.
            ``multiprocessing.reduction.ForkingPickler.register``.

    Returns:
        The packages that were registered.
    """
    done = []
    for name in _PACKAGES:
        if sys.modules.get(name) is not None:
            _register_package(name, register)
            done.append(name)
    return done


def _register_package(name: str, register: Callable[[type, Callable[[Any], Any]], None]) -> None:
    if name == "pandas":
        pd = sys.modules["pandas"]
        types: list[type] = [
            pd.DataFrame,
            pd.Series,
            pd.Index,
            pd.RangeIndex,
            pd.MultiIndex,
            pd.DatetimeIndex,
            pd.TimedeltaIndex,
            pd.PeriodIndex,
            pd.CategoricalIndex,
            pd.IntervalIndex,
        ]
        for t in types:
            register(t, _reducer)
    elif name == "pyarrow":
        pa = sys.modules["pyarrow"]
        register(pa.Buffer, _reduce_arrow_buffer)
        resizable = getattr(pa, "ResizableBuffer", None)
        if resizable is not None:
            register(resizable, _reduce_arrow_buffer)
    elif name == "polars":
        pl = sys.modules["polars"]
        register(pl.DataFrame, _reducer)
        register(pl.Series, _reducer)


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Runs callbacks right after pandas, pyarrow or polars is imported."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[str], None]] = []
        self.pending = set(_PACKAGES)
        self._busy = threading.local()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in self.pending or getattr(self._busy, "on", False):
            return None
        self._busy.on = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy.on = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        loader = spec.loader
        hook = self

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec: Any) -> Any:
                return loader.create_module(spec)

            def exec_module(self, module: Any) -> None:
                # Put the real loader back so nothing else ever sees this one.
                module.__loader__ = loader
                if getattr(module, "__spec__", None) is not None:
                    module.__spec__.loader = loader
                loader.exec_module(module)
                hook.pending.discard(fullname)
                for cb in list(hook.callbacks):
                    cb(fullname)

            def __getattr__(self, item: str) -> Any:
                return getattr(loader, item)

        spec.loader = _Loader()
        return spec


def install() -> None:
    """Make handled objects pickle by handle through memshare and the stdlib.

    Registers the reducers with ``multiprocessing.reduction.ForkingPickler``
    (stdlib ``multiprocessing`` and ``concurrent.futures``) and with
    ``memshare._array.extra_reducers`` (memshare's own pickler), now for the
    packages already imported and on import for the others. Idempotent.
    """
    global _INSTALLED
    with _HOOK_LOCK:
        if _INSTALLED:
            return
        _INSTALLED = True
    from multiprocessing.reduction import ForkingPickler

    from . import _array

    def register(t: type, fn: Callable[[Any], Any]) -> None:
        ForkingPickler.register(t, fn)
        _array.extra_reducers[t] = fn

    register_reducers_on_import(register)


_INSTALLED = False
_HOOK: _PostImportHook | None = None
_HOOK_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    global _HOOK_LOCK
    _HOOK_LOCK = threading.Lock()  # another thread may have held it at fork


os.register_at_fork(after_in_child=_after_fork_in_child)


def register_reducers_on_import(
    register: Callable[[type, Callable[[Any], Any]], None],
) -> None:
    """Register reducers now for imported packages and later for the others.

    A finder on ``sys.meta_path`` calls :func:`register_reducers` for pandas,
    pyarrow or polars as soon as the package finishes importing.
    """
    global _HOOK
    register_reducers(register)
    with _HOOK_LOCK:
        if _HOOK is None:
            _HOOK = _PostImportHook()
            _HOOK.pending -= {k for k, v in sys.modules.items() if v is not None}
            sys.meta_path.insert(0, _HOOK)
        _HOOK.callbacks.append(lambda name: _register_package(name, register))


# --------------------------------------------------------------------------
# Encoding: object -> spec
# --------------------------------------------------------------------------
#
# A spec node is a tuple whose first item is a tag naming its rebuild
# function in _REBUILD. ``leaf`` maps every numpy data buffer (identity when
# pickling, share_array when sharing). ``local`` lets a node carry objects
# that are only used by a rebuild in this same process (never pickled).


def _identity(arr: np.ndarray) -> np.ndarray:
    return arr


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


def _rebuild(spec: tuple) -> Any:
    """Rebuild the object a spec describes (pickle's reconstructor)."""
    return _REBUILD[spec[0]](spec)


# ---- pandas -------------------------------------------------------------


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


def _plain(arr: np.ndarray) -> np.ndarray:
    """A base-class view of a shared array for pandas to hold.

    pandas would keep an ndarray subclass in its blocks and propagate it to
    the results of arithmetic on the frame, which live in private memory;
    a plain view keeps the memory alive through ``.base`` and pickles through
    the core's reducer for ndarrays over shared memory.
    """
    return arr if type(arr) is np.ndarray else arr.view(np.ndarray)


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


# ---- object arrays ------------------------------------------------------

# id(object ndarray) -> (weakref to it, its encoded node). Object arrays built
# by a rebuild keep their shared large_string encoding here, so pickling them
# again sends handles instead of encoding the strings again. The arrays are
# read-only, so the entry cannot go stale.
# No lock: single dict operations are atomic, and an id cannot be reused
# before the weakref callback of its previous owner has run.
_OBJECT_CACHE: dict[int, tuple[weakref.ref, tuple]] = {}


def _cache_object(arr: np.ndarray, node: tuple) -> None:
    key = id(arr)

    def drop(_: Any, key: int = key) -> None:
        entry = _OBJECT_CACHE.get(key)
        if entry is not None and entry[0]() is None:
            _OBJECT_CACHE.pop(key, None)

    _OBJECT_CACHE[key] = (weakref.ref(arr, drop), node)


def _cached_object(arr: np.ndarray) -> tuple | None:
    entry = _OBJECT_CACHE.get(id(arr))
    if entry is not None and entry[0]() is arr:
        return entry[1]
    return None


def _enc_object(arr: np.ndarray, leaf: Leaf, local: bool) -> tuple:
    """Encode an object array: strings as large_string buffers, else in-band."""
    cached = _cached_object(arr)
    if cached is not None:
        return cached if leaf is _identity else _map_object_leaves(cached, leaf)
    if arr.ndim == 2:
        rows = [_enc_object_1d(arr[i], leaf) for i in range(arr.shape[0])]
        node: tuple = ("obj2d", arr.shape, rows)
    elif arr.ndim == 1:
        node = _enc_object_1d(arr, leaf)
    else:
        node = ("objpy", arr)
    if local:
        # The rebuild in this process reuses a read-only copy of the objects
        # instead of decoding the strings again.
        own = arr.copy()
        own.flags.writeable = False
        return ("objlocal", node, own)
    return node


def _map_object_leaves(node: tuple, leaf: Leaf) -> tuple:
    """Apply ``leaf`` to the buffers of an encoded object array."""
    if node[0] == "objstr":
        _, n, offsets, data, validity, na = node
        return (
            "objstr",
            n,
            leaf(offsets),
            leaf(data),
            None if validity is None else leaf(validity),
            na,
        )
    if node[0] == "obj2d":
        return ("obj2d", node[1], [_map_object_leaves(r, leaf) for r in node[2]])
    return node


def _enc_object_1d(arr: np.ndarray, leaf: Leaf) -> tuple:
    enc = _encode_strings(arr)
    if enc is None:
        return ("objpy", arr)
    offsets, data, validity, na = enc
    return (
        "objstr",
        len(arr),
        leaf(offsets),
        leaf(data),
        None if validity is None else leaf(validity),
        na,
    )


def _missing_mask(arr: np.ndarray) -> np.ndarray:
    pd = sys.modules.get("pandas")
    if pd is not None:
        return np.asarray(pd.isna(arr), dtype=bool)
    return np.fromiter(
        (x is None or (isinstance(x, float) and x != x) for x in arr), bool, len(arr)
    )


def _encode_strings(arr: np.ndarray) -> tuple | None:
    """Arrow large_string buffers for a 1-D object array of ``str``.

    Missing values must all be the same kind (all ``None``, all NaN, all
    ``pd.NA``...) so they can be restored exactly. Returns None when the array
    holds anything else (the caller pickles it in-band).
    """
    n = len(arr)
    mask = _missing_mask(arr)
    na: Any = None
    if mask.any():
        missing = arr[mask]
        na = missing[0]
        kind = type(na)
        if kind is float or kind is np.float64:
            if not all(type(x) is kind for x in missing):
                return None
        elif not all(x is na for x in missing):
            return None
        values = arr[~mask]
    else:
        values = arr
    if len(values) and set(map(type, values)) != {str}:
        return None
    try:
        if _has_pyarrow():
            pa = sys.modules["pyarrow"]
            if mask.any():
                arr = arr.copy()
                arr[mask] = None
            pa_arr = pa.array(arr, type=pa.large_string())
            validity_buf, offsets_buf, data_buf = pa_arr.buffers()
            offsets = np.frombuffer(offsets_buf, dtype=np.int64)[: n + 1]
            data = np.frombuffer(data_buf, dtype=np.uint8)[: int(offsets[-1]) if n else 0]
            validity = None
            if validity_buf is not None and pa_arr.null_count:
                validity = np.frombuffer(validity_buf, dtype=np.uint8)[: (n + 7) // 8]
        else:
            encoded = [b"" if m else s.encode("utf-8") for s, m in zip(arr, mask, strict=False)]
            offsets = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(np.fromiter(map(len, encoded), np.int64, n), out=offsets[1:])
            data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
            validity = np.packbits(~mask, bitorder="little") if mask.any() else None
    except (UnicodeEncodeError, ValueError, TypeError, OverflowError):
        return None  # e.g. lone surrogates, which UTF-8 cannot hold
    if n == 0:
        offsets = np.zeros(1, dtype=np.int64)
    return offsets, data, validity, na


_PYARROW_CHECKED: list[bool] = []


def _has_pyarrow() -> bool:
    if not _PYARROW_CHECKED:
        try:
            importlib.import_module("pyarrow")
            _PYARROW_CHECKED.append(True)
        except ImportError:
            _PYARROW_CHECKED.append(False)
    return _PYARROW_CHECKED[0]


def _decode_strings(
    n: int, offsets: np.ndarray, data: np.ndarray, validity: np.ndarray | None, na: Any
) -> np.ndarray:
    if n and _has_pyarrow():
        pa = sys.modules["pyarrow"]
        pa_arr = pa.Array.from_buffers(
            pa.large_string(),
            n,
            [
                None if validity is None else pa.py_buffer(validity),
                pa.py_buffer(offsets),
                pa.py_buffer(data),
            ],
        )
        out = pa_arr.to_numpy(zero_copy_only=False)
        if not out.flags.writeable:
            out = out.copy()
    else:
        raw = data.tobytes()
        bounds = offsets.tolist()
        out = np.empty(n, dtype=object)
        out[:] = [raw[bounds[i] : bounds[i + 1]].decode("utf-8") for i in range(n)]
    if validity is not None:
        valid = np.unpackbits(validity, count=n, bitorder="little").astype(bool)
        out[~valid] = na
    return out


def _reb_objstr(spec: tuple) -> np.ndarray:
    _, n, offsets, data, validity, na = spec
    out = _decode_strings(n, offsets, data, validity, na)
    out.flags.writeable = False
    _cache_object(out, spec)
    return out


def _reb_objpy(spec: tuple) -> np.ndarray:
    return spec[1]


def _reb_obj2d(spec: tuple) -> np.ndarray:
    _, shape, rows = spec
    out = np.empty(shape, dtype=object)
    for i, row in enumerate(rows):
        out[i] = _rebuild(row)
    out.flags.writeable = False
    _cache_object(out, spec)
    return out


def _reb_objlocal(spec: tuple) -> np.ndarray:
    _, node, own = spec
    _cache_object(own, node)
    return own


# ---- generic: pickle protocol 5 ----------------------------------------


def _enc_pickle5(obj: Any, leaf: Leaf) -> tuple:
    """Pickle ``obj`` with its out-of-band buffers as separate arrays."""
    buffers: list[pickle.PickleBuffer] = []
    inband = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    arrays = [leaf(np.frombuffer(b.raw(), dtype=np.uint8)) for b in buffers]
    return ("p5", inband, arrays)


def _reb_pickle5(spec: tuple) -> Any:
    _, inband, arrays = spec
    return pickle.loads(inband, buffers=arrays)


# ---- pyarrow ------------------------------------------------------------


def _enc_arrow(obj: Any, leaf: Leaf) -> tuple:
    pa = sys.modules["pyarrow"]
    if isinstance(obj, pa.ChunkedArray):
        return ("pa_chunked", obj.type, [_enc_pa_array(c, leaf) for c in obj.chunks])
    if isinstance(obj, pa.Table):
        return ("pa_table", obj.schema, [_enc_arrow(c, leaf) for c in obj.columns])
    if isinstance(obj, pa.RecordBatch):
        return ("pa_batch", obj.schema, [_enc_pa_array(c, leaf) for c in obj.columns])
    if isinstance(obj, pa.Array):
        return _enc_pa_array(obj, leaf)
    return _enc_pickle5(obj, leaf)


def _enc_pa_array(arr: Any, leaf: Leaf) -> tuple:
    """Encode an Arrow array through pyarrow's own pickle recipe.

    ``Array.__reduce__`` gives ``(_restore_array, (data,))`` where ``data`` is
    ``(type, length, null_count, offset, buffers, children, dictionary)``; the
    buffers become numpy arrays and ``_restore_array`` rebuilds the array over
    them without copying, for every nested, dictionary and extension type.
    """
    pa = sys.modules["pyarrow"]
    # A small slice of a large array would carry its whole buffers along.
    if arr.offset or arr.get_total_buffer_size() > 2 * arr.nbytes + 4096:
        try:
            arr = pa.concat_arrays([arr])
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
            pass
    reduced = arr.__reduce__()
    if getattr(reduced[0], "__name__", "") != "_restore_array":
        return _enc_pickle5(arr, leaf)
    return ("pa_array", reduced[0], _enc_pa_data(reduced[1][0], leaf))


def _enc_pa_data(data: tuple, leaf: Leaf) -> tuple:
    typ, length, null_count, offset, buffers, children, dictionary = data
    bufs = []
    for b in buffers:
        if b is None:
            bufs.append(None)
        elif not b.is_cpu:
            raise TypeError("memshare can only share Arrow data in CPU memory")
        else:
            bufs.append(leaf(np.frombuffer(b, dtype=np.uint8)))
    return (
        typ,
        length,
        null_count,
        offset,
        bufs,
        [_enc_pa_data(c, leaf) for c in children],
        None if dictionary is None else _enc_pa_data(dictionary, leaf),
    )


def _reb_pa_data(data: tuple) -> tuple:
    pa = sys.modules["pyarrow"]
    typ, length, null_count, offset, bufs, children, dictionary = data
    return (
        typ,
        length,
        null_count,
        offset,
        [None if b is None else pa.py_buffer(b) for b in bufs],
        [_reb_pa_data(c) for c in children],
        None if dictionary is None else _reb_pa_data(dictionary),
    )


def _reb_pa_array(spec: tuple) -> Any:
    _require("pyarrow")
    _, restore, data = spec
    return restore(_reb_pa_data(data))


def _reb_pa_chunked(spec: tuple) -> Any:
    pa = _require("pyarrow")
    _, typ, chunks = spec
    return pa.chunked_array([_rebuild(c) for c in chunks], type=typ)


def _reb_pa_table(spec: tuple) -> Any:
    pa = _require("pyarrow")
    _, schema, columns = spec
    return pa.Table.from_arrays([_rebuild(c) for c in columns], schema=schema)


def _reb_pa_batch(spec: tuple) -> Any:
    pa = _require("pyarrow")
    _, schema, columns = spec
    return pa.RecordBatch.from_arrays([_rebuild(c) for c in columns], schema=schema)


# ---- polars -------------------------------------------------------------


def _enc_polars(obj: Any, leaf: Leaf) -> tuple:
    """polars objects travel as Arrow tables (one record batch per chunk).

    The newest compat level keeps polars' own layouts (string views), so
    ``pl.from_arrow`` can take them without converting.
    """
    pl = sys.modules["polars"]
    _require("pyarrow")
    is_series = isinstance(obj, pl.Series)
    frame = obj.to_frame() if is_series else obj
    try:
        table = frame.to_arrow(compat_level=pl.CompatLevel.newest())
    except Exception:
        return _enc_pickle5(obj, leaf)
    return ("pl", is_series, _enc_arrow(table, leaf))


def _reb_polars(spec: tuple) -> Any:
    pl = _require("polars")
    _, is_series, table = spec
    df = pl.from_arrow(_rebuild(table), rechunk=False)
    return df.to_series() if is_series else df


_REBUILD: dict[str, Callable[[tuple], Any]] = {
    "pd_df": _reb_dataframe,
    "pd_series": _reb_series,
    "pd_index": _reb_index,
    "list": _reb_list,
    "lit": _reb_lit,
    "nd": lambda spec: _plain(spec[1]),
    "nd_view": lambda spec: _plain(spec[1]).view(spec[2]),
    "pd_cat": _reb_cat,
    "pd_ndb": _reb_ndb,
    "pd_masked": _reb_masked,
    "pd_interval": _reb_interval,
    "pd_arrow": _reb_pd_arrow,
    "objstr": _reb_objstr,
    "objpy": _reb_objpy,
    "obj2d": _reb_obj2d,
    "objlocal": _reb_objlocal,
    "p5": _reb_pickle5,
    "pa_array": _reb_pa_array,
    "pa_chunked": _reb_pa_chunked,
    "pa_table": _reb_pa_table,
    "pa_batch": _reb_pa_batch,
    "pl": _reb_polars,
}
