"""SharedArray: numpy arrays whose data lives in memshare shared memory.

An array's memory is a block of the arena owned by a ``_native.Block``; the
array (and every view of it) keeps the block alive through numpy's ``base``
chain. Pickling a shared array produces a small message (a 64-byte handle plus
dtype, shape, strides and offset) instead of the data; unpickling it in any
process maps the same memory.
"""

from __future__ import annotations

import ast
import functools
import io
import multiprocessing.reduction
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np

from . import _native

__all__ = [
    "SharedArray",
    "dumps",
    "empty",
    "empty_like",
    "full",
    "full_like",
    "is_shared",
    "loads",
    "share_array",
    "zeros",
    "zeros_like",
]

try:
    _byte_bounds = np.lib.array_utils.byte_bounds  # numpy >= 2.0
except AttributeError:  # pragma: no cover - numpy 1.26
    _byte_bounds = np.byte_bounds


def _encode_dtype(dt: np.dtype) -> str:
    if dt.fields is None and dt.subdtype is None:
        return dt.str
    return "descr:" + repr(np.lib.format.dtype_to_descr(dt))


@functools.lru_cache(maxsize=256)
def _decode_dtype(s: str) -> np.dtype:
    # Cached: every array received decodes one, and a program sends few dtypes.
    if s.startswith("descr:"):
        return np.lib.format.descr_to_dtype(ast.literal_eval(s[len("descr:") :]))
    return np.dtype(s)


def _check_dtype(dt: np.dtype) -> None:
    if dt.hasobject:
        raise TypeError(
            f"memshare cannot place dtype {dt} in shared memory: it holds pointers to Python "
            "objects that only exist in this process. Convert to a fixed-width dtype "
            "(e.g. arr.astype('U') for strings) or share a pandas/Arrow object instead."
        )


def _data_address(arr: np.ndarray) -> int:
    """``arr``'s data pointer (through the buffer protocol where numpy
    exports one: ``__array_interface__`` builds a dict, 5 µs a call)."""
    address = _native.data_address(arr)
    return arr.__array_interface__["data"][0] if address is None else address


def _block_of(arr: np.ndarray) -> tuple[_native.Block, int] | None:
    """The shared block under ``arr`` and the byte offset of ``arr.data`` in it."""
    base = arr
    while base is not None:
        if isinstance(base, _native.Block):
            return base, _data_address(arr) - base.address
        base = getattr(base, "base", None) if not isinstance(base, memoryview) else base.obj
    if arr.size == 0:
        return None
    lo, hi = _byte_bounds(arr)
    found = _native.find(lo, hi - lo)
    if found is None:
        return None
    block, off = found
    return block, off + (_data_address(arr) - lo)


def is_shared(obj: Any) -> bool:
    """True if ``obj`` (an ndarray or any buffer) lies in memshare shared memory."""
    if not isinstance(obj, np.ndarray):
        try:
            obj = np.frombuffer(obj, dtype=np.uint8)
        except (TypeError, ValueError):
            return False
    return _block_of(obj) is not None


def _array_message(arr: np.ndarray, owner: _native.Block | None = None) -> bytes | None:
    found = _block_of(arr)
    if found is None:
        return None
    block, offset = found
    return block.array_message(
        _encode_dtype(arr.dtype), arr.dtype.itemsize, arr.shape, arr.strides, offset, owner
    )


def _rebuild(message: bytes) -> SharedArray:
    """Unpickles a shared array: maps the same memory in this process."""
    block, dtype, itemsize, shape, strides, offset = _native.open_array(message)
    dt = _decode_dtype(dtype)
    if dt.itemsize != itemsize:
        raise _native.HandleError("memshare: array message dtype does not match its item size")
    return np.ndarray.__new__(
        SharedArray, tuple(shape), dt, buffer=block, offset=offset, strides=tuple(strides)
    )


def _rebuild_private(message: bytes) -> np.ndarray:
    """Unpickles an array as a private copy without copying: a copy-on-write
    mapping of the shared block, so writes stay in this process (the
    semantics of an argument pickled by value) and only written pages are
    ever copied."""
    block, dtype, itemsize, shape, strides, offset = _native.open_array(message)
    dt = _decode_dtype(dtype)
    if dt.itemsize != itemsize:
        raise _native.HandleError("memshare: array message dtype does not match its item size")
    view = block.copy_on_write()
    return np.ndarray(tuple(shape), dt, buffer=view, offset=offset, strides=tuple(strides))


class SharedArray(np.ndarray):
    """A ``numpy.ndarray`` whose data lives in memshare shared memory.

    Writes are visible in every process that holds the array (it is shared
    state, not a snapshot); arrays made with ``readonly=True`` cannot be
    written through numpy in any process. Pickling (any protocol, any
    transport) sends a handle of under 256 bytes whatever the size, and a
    slice or view arrives as the same view. Results of arithmetic that live in
    ordinary memory come back as plain ``numpy.ndarray``.

    The memory is freed when the last reference in any process goes away; no
    ``close()`` or ``unlink()`` is needed.
    """

    def __reduce_ex__(self, protocol: int) -> Any:
        message = _array_message(self)
        if message is None:
            return self.view(np.ndarray).__reduce_ex__(protocol)
        return (_rebuild, (message,))

    def __reduce__(self) -> Any:
        return self.__reduce_ex__(2)

    def __array_wrap__(self, obj, context=None, return_scalar=False):
        # ufunc outputs are fresh private arrays unless written into shared memory.
        if return_scalar:
            return obj[()]
        if isinstance(obj, np.ndarray) and obj is not self and _block_of(obj) is None:
            return obj.view(np.ndarray)
        return obj

    def __repr__(self) -> str:
        return "Shared" + repr(self.view(np.ndarray)).replace("\n", "\n      ")


def _new(shape, dtype, order: str, zero: bool, readonly: bool = False) -> SharedArray:
    dt = np.dtype(dtype)
    _check_dtype(dt)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    if order not in ("C", "F"):
        raise ValueError("order must be 'C' or 'F'")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    block = _native.alloc(nbytes, readonly=readonly, zero=zero)
    return np.ndarray.__new__(SharedArray, shape, dt, buffer=block, order=order)


def empty(shape, dtype=float, order: str = "C") -> SharedArray:
    """A new uninitialised array in shared memory (no copy, no page touching)."""
    return _new(shape, dtype, order, zero=False)


def zeros(shape, dtype=float, order: str = "C") -> SharedArray:
    """A new zero-filled array in shared memory."""
    return _new(shape, dtype, order, zero=True)


def full(shape, fill_value, dtype=None, order: str = "C") -> SharedArray:
    """A new array in shared memory filled with ``fill_value``."""
    if dtype is None:
        dtype = np.array(fill_value).dtype
    out = _new(shape, dtype, order, zero=False)
    out.fill(fill_value)
    return out


def _like_order(a: np.ndarray, order: str) -> str:
    if order == "K":
        return "F" if a.flags.f_contiguous and not a.flags.c_contiguous else "C"
    return order


def empty_like(a, dtype=None, order: str = "K", shape=None) -> SharedArray:
    """A new uninitialised shared array with the shape and dtype of ``a``."""
    a = np.asanyarray(a)
    return empty(a.shape if shape is None else shape, dtype or a.dtype, _like_order(a, order))


def zeros_like(a, dtype=None, order: str = "K", shape=None) -> SharedArray:
    """A new zero-filled shared array with the shape and dtype of ``a``."""
    a = np.asanyarray(a)
    return zeros(a.shape if shape is None else shape, dtype or a.dtype, _like_order(a, order))


def full_like(a, fill_value, dtype=None, order: str = "K", shape=None) -> SharedArray:
    """A new shared array with the shape and dtype of ``a``, filled with ``fill_value``."""
    a = np.asanyarray(a)
    return full(
        a.shape if shape is None else shape, fill_value, dtype or a.dtype, _like_order(a, order)
    )


def share_array(arr, readonly: bool = False) -> SharedArray:
    """Copies ``arr`` into shared memory (one copy) and returns a SharedArray.

    An array already in shared memory is returned as is (no copy) unless
    ``readonly`` asks for a read-only copy of a writable one. C-order and
    F-order inputs keep their layout; other layouts are stored C-order.
    """
    arr = np.asanyarray(arr)
    _check_dtype(arr.dtype)
    if isinstance(arr, SharedArray) or type(arr) is np.ndarray:
        found = _block_of(arr)
        if found is not None and (found[0].readonly or not readonly):
            return arr if isinstance(arr, SharedArray) else arr.view(SharedArray)
    if arr.flags.c_contiguous:
        src, order = arr, "C"
    elif arr.flags.f_contiguous:
        src, order = arr.T, "F"  # the transpose of an F-order array is C-contiguous
    else:
        src, order = np.ascontiguousarray(arr), "C"
    block = _native.alloc(arr.nbytes, readonly=readonly)
    if arr.nbytes:
        _native.copy_into(block, src.reshape(-1).view(np.uint8))
    return np.ndarray.__new__(SharedArray, arr.shape, arr.dtype, buffer=block, order=order)


# --- pickling ---------------------------------------------------------------


def _reduce_plain_ndarray(arr: np.ndarray):
    """ForkingPickler reducer: plain arrays over shared memory go by handle."""
    message = _array_message(arr)
    if message is None:
        return arr.__reduce_ex__(4)
    return (_rebuild, (message,))


multiprocessing.reduction.ForkingPickler.register(np.ndarray, _reduce_plain_ndarray)

#: Extra reducers (type -> reduce function) that memshare's own pickler uses,
#: filled in by the DataFrame/Arrow support.
extra_reducers: dict[type, Callable[[Any], Any]] = {}

#: Out-of-band buffers at least this large are placed in shared memory.
OUT_OF_BAND_THRESHOLD = 64 * 1024


class _Pickler(pickle.Pickler):
    def __init__(self, file, buffer_callback, pin_owner):
        super().__init__(file, protocol=5, buffer_callback=buffer_callback)
        self._pin_owner = pin_owner

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray) and not obj.dtype.hasobject:
            message = _array_message(obj, self._pin_owner)
            if message is None and obj.nbytes >= OUT_OF_BAND_THRESHOLD:
                # Copy into shared memory here rather than leave it to pickle's
                # out-of-band buffers: numpy pickles some dtypes (datetime64,
                # timedelta64) in-band.
                message = _array_message(share_array(obj), self._pin_owner)
            if message is not None:
                return (_rebuild, (message,))
            return NotImplemented
        reducer = extra_reducers.get(type(obj))
        if reducer is not None:
            return reducer(obj)
        return NotImplemented


def dumps(obj: Any, pin_owner: _native.Block | None = None) -> bytes:
    """Pickles ``obj`` so that shared data travels by handle.

    Shared arrays become handles; large out-of-band buffers (pickle protocol 5)
    of anything else are copied into shared memory once and travel by handle
    too; small ones stay inline. ``pin_owner`` makes the handles' pins belong
    to that block (a queue) instead of this process.
    """
    buffers: list[pickle.PickleBuffer] = []
    f = io.BytesIO()
    _Pickler(f, buffers.append, pin_owner).dump(obj)
    if not buffers:
        return b"\x00" + f.getvalue()
    parts = []
    for pb in buffers:
        raw = pb.raw()
        if raw.nbytes >= OUT_OF_BAND_THRESHOLD:
            shared = share_array(np.frombuffer(raw, dtype=np.uint8))
            parts.append(("h", _array_message(shared, pin_owner)))
        else:
            parts.append(("b", bytes(raw)))
    return b"\x01" + pickle.dumps((f.getvalue(), parts), protocol=5)


def loads(data: bytes) -> Any:
    """Inverse of :func:`dumps`."""
    if data[:1] == b"\x00":
        return pickle.loads(memoryview(data)[1:])
    if data[:1] != b"\x01":
        raise _native.HandleError("memshare: not a memshare message")
    inband, parts = pickle.loads(memoryview(data)[1:])
    buffers = [_rebuild(p) if kind == "h" else p for kind, p in parts]
    return pickle.loads(inband, buffers=buffers)
