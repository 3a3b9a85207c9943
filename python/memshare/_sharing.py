"""The sharing rule: what travels by handle, when, pinned by whom, and how it
is rebuilt. Every pickling path of memshare goes through this module.

* **Transports carry handles.** multiprocessing's ``ForkingPickler`` (so the
  stdlib ``Pool``, ``Queue``, ``Pipe`` and ``concurrent.futures``) sends an
  array whose data lies in shared memory as a one-entry message
  (:func:`reduce_for_transport`), pinned by the sending process.
  memshare's Pool, Executor and Queue pickle with :class:`Pickler`: arrays
  and large out-of-band buffers go into the message's handle table through
  pickle's ``persistent_id``, and arrays or buffers of at least
  ``share_threshold`` bytes that are not shared yet are copied into shared
  memory on the way. Their pins belong to a :class:`Lease` (a pool call) or
  to the sending process, and move to the queue while a message waits there.
* **Every other pickling keeps the data.** ``SharedArray.__reduce_ex__``
  pickles by value (see ``_array``): protocol 5 with a ``buffer_callback``
  hands out the shared pages themselves, and what loads is a plain numpy
  array in private memory. Nothing is pinned.
* **Explicit handles** for users' own channels: :func:`dumps` /
  :func:`loads`, pinned by the sending process.

The dtype travels in the table entry (covered by its MAC) in a small
explicit codec (:func:`encode_dtype`); decoding never evaluates text.
"""

from __future__ import annotations

import functools
import io
import json
import os
import pickle
import re
import weakref
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np

from . import _native
from ._errors import HandleError

__all__ = [
    "DEFAULT_SHARE_THRESHOLD",
    "Lease",
    "Pickler",
    "decode_dtype",
    "dumps",
    "encode_dtype",
    "loads",
    "loads_message",
    "reduce_for_transport",
]

#: The one default for "large enough to copy into shared memory on the way"
#: (Pool, Executor, Queue, :func:`dumps` and the allocator hook).
DEFAULT_SHARE_THRESHOLD = 1 << 20

#: The owner of the pins of one transport call (see ``_native.Lease``).
Lease = _native.Lease

#: A table entry as the bindings take it:
#: (block, dtype code, itemsize, shape, strides, offset).
Entry = tuple

# --- the dtype codec ----------------------------------------------------------

# A plain dtype is numpy's own ``dtype.str`` ("<f8", "|b1", "<M8[10us]", "<U5").
_SIMPLE = re.compile(r"[<>|][a-zA-Z][0-9]{0,9}(\[[0-9]{0,9}[a-zA-Z]{1,3}\])?")
_MAX_DEPTH = 8


@functools.lru_cache(maxsize=256)
def encode_dtype(dt: np.dtype) -> str | None:
    """The description of ``dt`` carried in a message, or None if it cannot
    travel by handle (object fields, titles): such arrays go by value."""
    if dt.hasobject:
        return None
    try:
        node = _dtype_node(dt, 0)
    except ValueError:
        return None
    return node if isinstance(node, str) else json.dumps(node, separators=(",", ":"))


def _dtype_node(dt: np.dtype, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise ValueError("dtype nests too deeply")
    if dt.subdtype is not None:
        base, shape = dt.subdtype
        return {"b": _dtype_node(base, depth + 1), "s": list(shape)}
    if dt.fields is None:
        if not _SIMPLE.fullmatch(dt.str) or np.dtype(dt.str) != dt:
            raise ValueError("dtype has no plain description")
        return dt.str
    names = list(dt.names)
    fields = [dt.fields[n] for n in names]
    if any(len(f) > 2 for f in fields):
        raise ValueError("titled fields do not travel by handle")
    # Short keys (names, formats, offsets, itemsize): messages stay small.
    return {
        "n": names,
        "f": [_dtype_node(f[0], depth + 1) for f in fields],
        "o": [int(f[1]) for f in fields],
        "i": dt.itemsize,
    }


@functools.lru_cache(maxsize=256)
def decode_dtype(code: str, itemsize: int) -> np.dtype:
    """The dtype of a received entry. Any description that is not one
    :func:`encode_dtype` makes, or that disagrees with ``itemsize``, raises
    :class:`HandleError`; object dtypes are refused (they would turn shared
    bytes into pointers). Cached: every array received decodes one, and a
    program sends few dtypes."""
    try:
        if code.startswith("{"):
            dt = _node_dtype(json.loads(code), 0)
        elif _SIMPLE.fullmatch(code):
            dt = np.dtype(code)
        else:
            raise ValueError("not a dtype description")
    except (ValueError, TypeError, KeyError, RecursionError, OverflowError, MemoryError) as e:
        raise HandleError(f"memshare: message has a bad dtype description: {e}") from None
    if dt.hasobject:
        raise HandleError("memshare: message describes an object dtype; refusing it")
    if dt.itemsize != itemsize:
        raise HandleError("memshare: message dtype does not match its item size")
    return dt


def _ints(v: Any, what: str) -> list[int]:
    if not isinstance(v, list) or not all(type(i) is int and i >= 0 for i in v):
        raise ValueError(f"{what} must be a list of non-negative ints")
    return v


def _node_dtype(node: Any, depth: int) -> np.dtype:
    if depth > _MAX_DEPTH:
        raise ValueError("dtype nests too deeply")
    if isinstance(node, str):
        if not _SIMPLE.fullmatch(node):
            raise ValueError("not a plain dtype")
        return np.dtype(node)
    if not isinstance(node, dict):
        raise ValueError("dtype node must be a string or an object")
    if set(node) == {"b", "s"}:
        shape = tuple(_ints(node["s"], "shape"))
        if len(shape) > 32:
            raise ValueError("subarray has too many dimensions")
        return np.dtype((_node_dtype(node["b"], depth + 1), shape))
    if set(node) != {"n", "f", "o", "i"}:
        raise ValueError("unknown dtype fields")
    names, formats = node["n"], node["f"]
    offsets = _ints(node["o"], "offsets")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError("names must be strings")
    if not isinstance(formats, list) or not len(names) == len(formats) == len(offsets):
        raise ValueError("names, formats and offsets differ in length")
    itemsize = node["i"]
    if type(itemsize) is not int or itemsize < 0:
        raise ValueError("itemsize must be a non-negative int")
    return np.dtype(
        {
            "names": names,
            "formats": [_node_dtype(f, depth + 1) for f in formats],
            "offsets": offsets,
            "itemsize": itemsize,
        }
    )


# --- arrays and table entries ---------------------------------------------------


def entry_of(arr: np.ndarray) -> Entry | None:
    """The table entry for ``arr`` if its data lies in shared memory and its
    dtype can travel, else None."""
    code = encode_dtype(arr.dtype)
    if code is None:
        return None
    found = _array._block_of(arr)
    if found is None:
        return None
    block, offset = found
    return (block, code, arr.dtype.itemsize, arr.shape, arr.strides, offset)


def rebuild_entry(entry: Entry, private: bool = False) -> np.ndarray:
    """The array an opened entry describes: a SharedArray over the block, or
    with ``private`` a plain array over a copy-on-write mapping of it (the
    semantics of an argument pickled by value; only written pages are
    copied)."""
    block, code, itemsize, shape, strides, offset = entry
    dt = decode_dtype(code, itemsize)
    if private:
        return np.ndarray(
            tuple(shape), dt, buffer=block.copy_on_write(), offset=offset, strides=tuple(strides)
        )
    return np.ndarray.__new__(
        _array.SharedArray, tuple(shape), dt, buffer=block, offset=offset, strides=tuple(strides)
    )


def _share_copy(arr: np.ndarray) -> np.ndarray:
    from ._array import share_array

    return share_array(arr)


# --- ForkingPickler: one-entry messages, pinned by this process -------------------


def reduce_for_transport(arr: np.ndarray) -> Any:
    """ForkingPickler reducer of numpy arrays: shared data goes as a
    one-entry message (the receiver maps the same memory), the rest by value."""
    from ._array import _rebuild  # a short global name: messages stay small

    entry = entry_of(arr)
    if entry is None:
        return arr.view(np.ndarray).__reduce_ex__(4)
    return (_rebuild, (_native.encode_message([entry], b""),))


def _rebuild_transported(message: bytes) -> np.ndarray:
    entries, payload = _native.decode_message(message)
    if len(entries) != 1 or payload:
        raise HandleError("memshare: not a single-array message")
    return rebuild_entry(entries[0])


# --- memshare's transports: a pickle over a handle table ------------------------

#: Extra reducers (type -> reduce function) for memshare's pickler, filled in
#: by the DataFrame/Arrow/polars support.
extra_reducers: dict[type, Callable[[Any], Any]] = {}

#: ``share(arr) -> (array to send, private)`` or None to pickle ``arr`` by value.
ShareFn = Callable[[np.ndarray], "tuple[np.ndarray, bool] | None"]


def _worth_sharing(arr: np.ndarray, threshold: int | None) -> bool:
    """A private array of at least ``threshold`` bytes (None: never) whose
    dtype can travel by handle."""
    return threshold is not None and arr.nbytes >= threshold and encode_dtype(arr.dtype) is not None


def transport_entry(arr: np.ndarray, threshold: int | None) -> Entry | None:
    """The table entry ``arr`` travels as: its own if it is shared, that of a
    shared copy if it is worth sharing, else None (it goes by value)."""
    entry = entry_of(arr)
    if entry is None and _worth_sharing(arr, threshold):
        entry = entry_of(_share_copy(arr))
    return entry


def default_share(threshold: int | None) -> ShareFn:
    """Shared arrays go as they are; private ones of at least ``threshold``
    bytes are copied into shared memory once (None: never)."""

    def share(arr: np.ndarray) -> tuple[np.ndarray, bool] | None:
        if entry_of(arr) is not None:
            return arr, False
        if _worth_sharing(arr, threshold):
            return _share_copy(arr), False
        return None

    return share


class _TableMixin:
    """``persistent_id`` over a handle table: arrays (and large pickle-5
    buffers) become entries; everything else is pickled as usual."""

    def _init_table(self, share: ShareFn, threshold: int | None) -> None:
        self.entries: list[Entry] = []
        self._share = share
        self._threshold = threshold
        self._memo: dict[int, tuple] = {}
        self._keep: list[Any] = []  # objects whose id() is in the memo

    def persistent_id(self, obj: Any) -> Any:
        t = type(obj)
        if t is pickle.PickleBuffer:
            return self._buffer_id(obj)
        if not isinstance(obj, np.ndarray) or obj.dtype.hasobject:
            return None
        pid = self._memo.get(id(obj))
        if pid is not None:
            return pid
        picked = self._share(obj)
        if picked is None:
            return None
        arr, private = picked
        entry = entry_of(arr)
        if entry is None:  # pragma: no cover - share() returns shared arrays
            return None
        self.entries.append(entry)
        pid = ("a", len(self.entries) - 1, private)
        self._memo[id(obj)] = pid
        self._keep.append(obj)
        return pid

    def _buffer_id(self, pb: pickle.PickleBuffer) -> Any:
        try:
            raw = pb.raw()
        except BufferError:  # not contiguous: pickled in-band
            return None
        arr = np.frombuffer(raw, dtype=np.uint8)
        entry = entry_of(arr)
        if entry is None:
            if self._threshold is None or raw.nbytes < self._threshold:
                return None
            entry = entry_of(_share_copy(arr))
        self.entries.append(entry)
        return ("b", len(self.entries) - 1, raw.readonly)

    def reducer_override(self, obj: Any) -> Any:
        reducer = extra_reducers.get(type(obj))
        if reducer is not None:
            return reducer(obj)
        return NotImplemented


class Pickler(_TableMixin, pickle.Pickler):
    """memshare's pickler: builds the payload of a message whose handle table
    is :attr:`entries` (see :func:`dumps`)."""

    def __init__(self, file: io.BytesIO, share: ShareFn, threshold: int | None):
        super().__init__(file, protocol=5)
        self._init_table(share, threshold)


class TransportPickler(_TableMixin, ForkingPickler):
    """:class:`Pickler` over ``ForkingPickler``, so every reducer registered
    with multiprocessing applies too (pool arguments and results)."""

    def __init__(self, file: io.BytesIO, share: ShareFn, threshold: int | None):
        ForkingPickler.__init__(self, file, 5)
        self._init_table(share, threshold)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, entries: list[Entry]):
        super().__init__(file)
        self._entries = entries
        self._built: dict[int, Any] = {}

    def persistent_load(self, pid: Any) -> Any:
        try:
            kind, i, flag = pid
            built = self._built.get(i)
            if built is not None:
                return built
            entry = self._entries[i]
        except (TypeError, ValueError, IndexError, KeyError):
            raise HandleError("memshare: message payload names no table entry") from None
        if kind == "a":
            built = rebuild_entry(entry, private=bool(flag))
        elif kind == "b":
            block, offset, nbytes = entry[0], entry[5], entry[3][0]
            mv = memoryview(block)[offset : offset + nbytes]
            built = pickle.PickleBuffer(mv.toreadonly() if flag else mv)
        else:
            raise HandleError("memshare: message payload names no table entry")
        self._built[i] = built
        return built


#: ``is_plain(value, depth=1)``: True for values that cannot hold shared
#: memory (exact int, float, bool, str, bytes, complex or None, or while
#: ``depth`` allows, a tuple or list of such values): they travel as an
#: ordinary pickle, with no handle table and no per-object hook. Native: it
#: runs on every small message and every batch of a pool's tasks.
is_plain = _native.is_plain


def table_and_payload(
    obj: Any, threshold: int | None = DEFAULT_SHARE_THRESHOLD
) -> tuple[list[Entry], bytes]:
    """The handle table entries and payload of ``obj``'s message with
    nothing pinned yet, for a transport that pins the entries where they
    travel (``memshare.Queue``)."""
    return _pickle_with_table(obj, None, threshold, False)


def _pickle_with_table(
    obj: Any, share: ShareFn | None, threshold: int | None, transport: bool
) -> tuple[list[Entry], bytes]:
    """(handle table entries, payload) of ``obj``."""
    if is_plain(obj):
        return [], pickle.dumps(obj, 5)
    f = io.BytesIO()
    cls = TransportPickler if transport else Pickler
    p = cls(f, share or default_share(threshold), threshold)
    p.dump(obj)
    return p.entries, f.getvalue()


#: The header of a message whose table lists nothing (from the encoder).
_PLAIN_HEADER = _native.encode_message([], b"")


def plain_message(obj: Any) -> bytes:
    """The message of a plain value (:func:`is_plain`): an empty table and
    its pickle, what :func:`encode` makes of it, with no call into the core."""
    return _PLAIN_HEADER + pickle.dumps(obj, 5)


def encode(
    obj: Any,
    *,
    lease: Any = None,
    share: ShareFn | None = None,
    threshold: int | None = DEFAULT_SHARE_THRESHOLD,
    transport: bool = False,
) -> bytes:
    """A message for ``obj``: its arrays in the handle table (pinned by
    ``lease`` or this process), the rest pickled into the payload."""
    if is_plain(obj):
        return plain_message(obj)
    entries, payload = _pickle_with_table(obj, share, threshold, transport)
    return _native.encode_message(entries, payload, lease)


def loads_message(entries: list[Entry], payload: bytes) -> Any:
    """Unpickles the payload of a message whose entries are open."""
    try:
        if not entries:
            try:
                return pickle.loads(payload)
            except pickle.UnpicklingError:
                # Perhaps a persistent id with no table to name: the table's
                # unpickler says so (HandleError), or fails as pickle did.
                return _Unpickler(io.BytesIO(payload), entries).load()
        return _Unpickler(io.BytesIO(payload), entries).load()
    except (pickle.UnpicklingError, EOFError) as e:
        # The table checked out (its MAC), the payload after it did not:
        # a message cut short or damaged on its way.
        raise HandleError(f"memshare: message payload is damaged ({e})") from None


#: This process's lease for :func:`dumps`, by pid (a forked child makes its own).
_dumps_leases: dict[int, Any] = {}


def _process_lease() -> Any:
    """This process's lease for :func:`dumps`: it ends when the process exits
    or dies, so a message that is never loaded keeps nothing past its
    sender's life. A forked child makes its own (its inherited copy ends
    nothing: only the process that took a lease can end it). ``setdefault``
    is atomic under the GIL, so two threads never end up with two leases
    (the one that lost would end, with the pins of its message, once that
    message was returned)."""
    pid = os.getpid()
    lease = _dumps_leases.get(pid)
    if lease is None:
        for other in [p for p in _dumps_leases if p != pid]:
            del _dumps_leases[other]  # inherited copies: dropping them ends nothing
        lease = _dumps_leases.setdefault(pid, _native.Lease())
    return lease


def dumps(obj: Any, threshold: int | None = DEFAULT_SHARE_THRESHOLD) -> bytes:
    """Pickles ``obj`` for another process of this user, shared data by handle.

    Arrays in shared memory, and arrays or pickle-5 buffers of at least
    ``threshold`` bytes (copied into shared memory once), travel as handles
    in the message's table; the rest is an ordinary pickle. Use it for your
    own channels (a socket, ZeroMQ, Redis, a file on this machine).

    Lifetime: the handles are pinned by this process (its ``dumps`` lease).
    :func:`loads` in any process adopts the pins (and can be called once per
    message); a message that is never loaded holds its memory until this
    process exits or dies, never longer. Loading after the data is gone
    raises :class:`StaleHandleError`.
    """
    entries, payload = _pickle_with_table(obj, None, threshold, False)
    if not entries:
        return _native.encode_message([], payload)
    # Data of an arena other than this process's own (received from another
    # process tree) is pinned by this process in that arena.
    return _native.encode_message(entries, payload, _process_lease(), foreign_by_process=True)


def loads(data: bytes) -> Any:
    """Inverse of :func:`dumps`: maps the same shared memory in this process.

    Raises:
        HandleError: ``data`` is not a memshare message (or was damaged).
        StaleHandleError: the data was freed (its sender exited, or the
            message was loaded already and nobody holds the data).
    """
    entries, payload = _native.decode_message(bytes(data))
    return loads_message(entries, payload)


# --- memshare's pools: what an argument or a result of a task travels as ------------
#
# ms.Pool and ms.ProcessPoolExecutor pickle a task's call with ForkingPickler
# (their callables may go by value, see ``_callables``); each array in it goes
# as a one-entry message decided here. A call's pins belong to its Lease, so a
# task that never reaches a worker releases them when the call ends.


def _one_entry(arr: np.ndarray, lease: Any = None, kept: bool = False) -> bytes | None:
    entry = entry_of(arr)
    if entry is None:
        return None
    return _native.encode_message([entry], b"", lease, kept)


def _shares_by_copy(arr: np.ndarray, threshold: int | None) -> bool:
    """True for a private array that is worth one copy into shared memory."""
    return (
        threshold is not None
        and arr.nbytes >= threshold
        and not arr.dtype.hasobject
        and encode_dtype(arr.dtype) is not None
    )


class CallMemo:
    """What one pool call has sent, so that an array every task receives
    costs one pin per call instead of one per task.

    The first time an array goes, its message is pinned for one receiver
    (consumed when a worker opens it): a stream of distinct arrays keeps
    nothing alive past its tasks. From the second time on, the call sends
    one message whose pin its lease keeps (``kept``): workers open it any
    number of times, and those that still have it open from their last task
    open nothing (:func:`open_kept`). Private arrays copied into shared
    memory are copied once per call, and the call holds its copies until it
    ends anyway: the first message of the first :data:`OWNED_KEPT` copies is
    kept too (``owned``; a call that streams many copies, or a frame of
    hundreds of buffers, does not fill the pin table with kept pins).
    """

    __slots__ = ("copies", "kept", "owned", "seen")

    #: Copies of a call whose first message is kept (see above).
    OWNED_KEPT = 16

    def __init__(self) -> None:
        #: data address -> shared copy this call made (held, so that no
        #: other array of the call can have its address meanwhile)
        self.owned: dict[int, np.ndarray] = {}
        #: key -> (array, its shared copy, kept message of the copy or None)
        self.copies: dict[tuple, list] = {}
        #: key -> (array, kept message): arrays sent more than once
        self.kept: dict[tuple, tuple[np.ndarray, bytes]] = {}
        #: key -> array sent once (weakly: a stream of arrays is not kept)
        self.seen: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def own(self, copy: np.ndarray) -> bool:
        """Records ``copy``, a shared copy this call made and holds; True if
        its first message is to be kept too (the first :data:`OWNED_KEPT`)."""
        if len(self.owned) >= self.OWNED_KEPT:
            return False
        self.owned[_native.data_address(copy)] = copy
        return True


def _memo_key(arr: np.ndarray) -> tuple:
    from ._array import _data_address

    return (_data_address(arr), arr.nbytes, arr.shape, arr.strides, arr.dtype.str)


def reduce_call_argument(
    arr: np.ndarray, memo: CallMemo, threshold: int | None, lease: Any
) -> tuple[Any, bool]:
    """How a pool call sends the array ``arr``: ``(reduce value or
    NotImplemented, copied)``.

    Arrays in shared memory go as they are (the caller's own shared state
    stays shared). Private arrays of at least ``threshold`` bytes are copied
    into shared memory once per call (``memo``, keyed by the array's memory)
    and arrive as copy-on-write views: a task that writes to its argument
    changes only its own copy, as with arguments pickled by value. Smaller
    ones are pickled by value. An array sent again in the same call, and a
    copy the call made, go as one message with a kept pin (see
    :class:`CallMemo`).
    """
    from ._array import _rebuild, _rebuild_kept, _rebuild_private

    if arr.dtype.hasobject:
        return NotImplemented, False
    if entry_of(arr) is not None:
        key = _memo_key(arr)
        hit = memo.kept.get(key)
        if hit is not None and hit[0] is arr:
            return (_rebuild_kept, (hit[1], False)), False
        if memo.seen.get(key) is arr or key[0] in memo.owned:
            message = _one_entry(arr, lease, kept=True)
            memo.kept[key] = (arr, message)
            return (_rebuild_kept, (message, False)), False
        memo.seen[key] = arr
        return (_rebuild, (_one_entry(arr, lease),)), False
    if not _shares_by_copy(arr, threshold):
        return NotImplemented, False
    key = _memo_key(arr)
    hit = memo.copies.get(key)
    if hit is None:
        # Keeping `arr` alive keeps its address from being reused in the call.
        copy = _share_copy(arr)
        if memo.own(copy):  # the call holds it anyway: kept from the first task
            hit = memo.copies[key] = [arr, copy, _one_entry(copy, lease, kept=True)]
            return (_rebuild_kept, (hit[2], True)), True
        memo.copies[key] = [arr, copy, None]
        return (_rebuild_private, (_one_entry(copy, lease),)), True
    if hit[2] is None:
        hit[2] = _one_entry(hit[1], lease, kept=True)
    return (_rebuild_kept, (hit[2], True)), False


# --- a pool worker's arguments that stay open from one task to the next --------------

#: message -> [opened entries, serial of the last task that used them]
_kept_open: dict[bytes, list] = {}
_task_serial = 0
#: True in a pool worker whose task queue calls :func:`worker_takes_task`
#: (elsewhere nothing would let go of kept arguments while idle).
_keep_arguments_open = False


def open_kept(message: bytes) -> list:
    """The opened entries of a message with a kept pin: those of the last
    task if it used the same message (no arena lock taken), else opened now."""
    hit = _kept_open.get(message)
    if hit is not None:
        hit[1] = _task_serial
        return hit[0]
    entries, payload = _native.decode_message(message)
    if len(entries) != 1 or payload:
        raise HandleError("memshare: not a single-array message")
    if _keep_arguments_open:
        _kept_open[message] = [entries, _task_serial]
    return entries


def begin_task() -> None:
    """A pool task starts: what the task before it did not use is let go."""
    global _task_serial
    for message in [m for m, (_, used) in _kept_open.items() if used != _task_serial]:
        del _kept_open[message]
    _task_serial += 1


def worker_holding() -> bool:
    """Asked by a pool worker's task queue (``_stdlib.TaskQueue``) as it takes
    a task: does this worker hold arguments, cached free blocks or put-off
    releases that it must let go of (:func:`worker_let_go`) before it waits? Being asked
    means it will be told to, so from then on it keeps arguments open
    between tasks (an idle pool holds nothing a finished call sent)."""
    global _keep_arguments_open
    _keep_arguments_open = True
    return bool(_kept_open) or _native.held_back_bytes() > 0


def worker_let_go() -> None:
    """This pool worker is about to wait for work: the arguments it kept
    open, the free blocks its tasks' temporaries left in its cache, and the
    results it sent and dropped (their releases put off) go."""
    _kept_open.clear()
    _native.flush_block_cache()


def reduce_task_result(arr: np.ndarray, threshold: int | None) -> tuple[Any, bool]:
    """How a pool worker sends the array ``arr`` back: ``(reduce value or
    NotImplemented, copied)``. Shared arrays go by handle; private ones of at
    least ``threshold`` bytes are copied into shared memory first (pinned by
    the worker until the parent opens them)."""
    from ._array import _rebuild

    if arr.dtype.hasobject:
        return NotImplemented, False
    message = _one_entry(arr)
    if message is not None:
        return (_rebuild, (message,)), False
    if not _shares_by_copy(arr, threshold):
        return NotImplemented, False
    return (_rebuild, (_one_entry(_share_copy(arr)),)), True


def share_task_result(obj: Any, threshold: int | None, depth: int = 0) -> tuple[Any, int]:
    """An Executor result with its large private arrays (also inside lists,
    tuples and dicts, four levels deep) copied into shared memory, so that
    the standard library's result pipe carries handles. Returns the object
    and the number of copies made."""
    if isinstance(obj, np.ndarray):
        if entry_of(obj) is None and _shares_by_copy(obj, threshold):
            return _share_copy(obj), 1
        return obj, 0
    if depth < 4:
        t = type(obj)
        if t is list or t is tuple:
            pairs = [share_task_result(v, threshold, depth + 1) for v in obj]
            copies = sum(n for _, n in pairs)
            if copies:
                return t(v for v, _ in pairs), copies
        elif t is dict:
            pairs_d = {k: share_task_result(v, threshold, depth + 1) for k, v in obj.items()}
            copies = sum(n for _, n in pairs_d.values())
            if copies:
                return {k: v for k, (v, _) in pairs_d.items()}, copies
    return obj, 0


# Last: ``_array`` uses this module's names while it is imported; this one
# uses ``_array``'s only when called (no import inside the hot functions).
from . import _array  # noqa: E402
