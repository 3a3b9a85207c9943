"""SharedArray: numpy arrays whose data lives in memshare shared memory.

An array's memory is a block of the arena owned by a ``_native.Block``; the
array (and every view of it) keeps the block alive through numpy's ``base``
chain. How shared arrays are pickled is decided in ``_sharing``: transports
(multiprocessing, memshare's Pool and Queue) send handles, every other
pickling keeps the data.
"""

from __future__ import annotations

import multiprocessing.reduction
from typing import Any

import numpy as np

from . import _native, _sharing

__all__ = [
    "SharedArray",
    "empty",
    "empty_like",
    "full",
    "full_like",
    "is_shared",
    "share_array",
    "zeros",
    "zeros_like",
]

try:
    _byte_bounds = np.lib.array_utils.byte_bounds  # numpy >= 2.0
except AttributeError:  # pragma: no cover - numpy 1.26
    _byte_bounds = np.byte_bounds


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


# Transitional names for the pools (they move onto ``_sharing`` with the
# pool package): a one-entry message and its two ways of loading.
def _encode_dtype(dt: np.dtype) -> str | None:
    return _sharing.encode_dtype(dt)


def _rebuild(message: bytes) -> np.ndarray:
    """Loads a one-entry message as a SharedArray over the same memory."""
    return _sharing._rebuild_transported(message)


def _rebuild_private(message: bytes) -> np.ndarray:
    """Loads a one-entry message as a private copy-on-write view."""
    entries, payload = _native.decode_message(message)
    if len(entries) != 1 or payload:
        raise _native.HandleError("memshare: not a single-array message")
    return _sharing.rebuild_entry(entries[0], private=True)


def _rebuild_kept(message: bytes, private: bool) -> np.ndarray:
    """Loads a pool call's argument sent with a kept pin (``_sharing.CallMemo``):
    a SharedArray, or with ``private`` a copy-on-write view (a fresh one per
    task, over the block the worker may still have open)."""
    return _sharing.rebuild_entry(_sharing.open_kept(message)[0], private=private)


class SharedArray(np.ndarray):
    """A ``numpy.ndarray`` whose data lives in memshare shared memory.

    Writes are visible in every process that holds the array (it is shared
    state, not a snapshot); arrays made with ``readonly=True`` cannot be
    written through numpy in any process. Sent through a transport
    (``multiprocessing``, ``concurrent.futures``, memshare's Pool and Queue)
    it travels as a handle of under 256 bytes whatever its size, and a slice
    or view arrives as the same view of the same memory. Any other pickling
    (``pickle.dump`` to a file, ``joblib``, ``copy``) keeps the data and
    loads as a plain ``numpy.ndarray`` in private memory; with protocol 5
    and a ``buffer_callback`` the out-of-band buffer is the shared pages
    themselves. Results of arithmetic that live in ordinary memory come back
    as plain ``numpy.ndarray``.

    The memory is freed when the last reference in any process goes away; no
    ``close()`` or ``unlink()`` is needed.
    """

    def __reduce_ex__(self, protocol: int) -> Any:
        # By value: the bytes must stay loadable after every process that
        # holds the memory has exited (transports register their own reducer).
        return self.view(np.ndarray).__reduce_ex__(protocol)

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

# Transports send arrays over shared memory by handle (see ``_sharing``).
multiprocessing.reduction.ForkingPickler.register(np.ndarray, _sharing.reduce_for_transport)
multiprocessing.reduction.ForkingPickler.register(SharedArray, _sharing.reduce_for_transport)

#: Extra reducers of memshare's pickler (the DataFrame/Arrow/polars support
#: fills it in); the same dict as ``_sharing.extra_reducers``.
extra_reducers = _sharing.extra_reducers
