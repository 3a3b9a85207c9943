"""Generic objects: ``object`` arrays (strings as Arrow ``large_string``
buffers, anything else in-band) and the pickle-5 fallback for objects this
package does not know."""

from __future__ import annotations

import importlib
import pickle
import sys
import weakref
from typing import Any

import numpy as np

from ._spec import _REBUILD, Leaf, _identity, _rebuild

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


_REBUILD.update(
    {
        "objstr": _reb_objstr,
        "objpy": _reb_objpy,
        "obj2d": _reb_obj2d,
        "objlocal": _reb_objlocal,
        "p5": _reb_pickle5,
    }
)
