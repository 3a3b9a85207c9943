"""memshare on Dask's wire: who can open handles, and the serializers.

Each memshare-aware process adds its memory identity to the handshake of every
comm that deserializes what it reads (workers, clients; not the scheduler,
which passes data through undeserialized). Dask hands serializers a
``context`` with the handshake of both ends, so the sender decides per
recipient: the same identity gets handles, anyone else (another host, a
private /dev/shm, a process that did not register, an old comm opened before
registration) gets Dask's own bytes.

Pins of the handles in a message belong to a lease (a pin owner) that lives
exactly as long as the sender waits for the recipient: the recipient adopts
each pin when it deserializes, and what it never opens (it died, the comm
broke, the request was cancelled) is released with the lease. A worker's
``get_data`` handler has a lease of its own (the recipient answers "OK" only
after deserializing); a request that expects a reply (``send_recv``: scatter,
``update_data``) drops the comm's lease when the reply arrives; anything else
is covered by the comm's lease, dropped with the comm.
"""

from __future__ import annotations

import contextvars
import functools
import sys
import threading
from collections.abc import Callable
from typing import Any

import distributed.core
import numpy as np
from distributed.comm.core import Comm
from distributed.protocol.serialize import dask_deserialize, dask_serialize
from distributed.utils import has_keyword

from .. import _frames
from . import _serialize
from ._identity import memory_identity

__all__ = ["enable", "enabled", "release_lease", "request_lease", "same_memory"]

#: Handshake key with the memory identity of a memshare-aware end.
HANDSHAKE_KEY = "memshare"
_LEASE_KEY = "memshare-lease"
_HEADER_KEY = "memshare"

_lock = threading.Lock()
_state: dict[str, Any] = {"identity": None, "threshold": None}


def enabled() -> bool:
    """True once :func:`enable` ran in this process."""
    return _state["identity"] is not None


def enable(threshold: int) -> None:
    """Makes this process memshare-aware on Dask's comms (idempotent)."""
    with _lock:
        _state["threshold"] = threshold
        if _state["identity"] is not None:
            return
        _patch_handshake()
        _register_serializers()
        _state["identity"] = memory_identity()


def same_memory(context: dict | None) -> bool:
    """True if the comm's other end advertised this process's memory identity."""
    if not context or _state["identity"] is None:
        return False
    recipient = context.get("recipient")
    return isinstance(recipient, dict) and recipient.get(HANDSHAKE_KEY) == _state["identity"]


def release_lease(comm: Comm) -> None:
    """Drops the comm's lease: pins of handles its peer never opened are released."""
    info = getattr(comm, "local_info", None)
    if isinstance(info, dict):
        info.pop(_LEASE_KEY, None)


#: The lease of the request being answered (a one-item list, filled lazily).
_request_lease: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "memshare_request_lease", default=None
)


def request_lease() -> contextvars.Token:
    """Starts a lease for the request handled in this context; give the
    token to :func:`end_request_lease` when the request is answered."""
    return _request_lease.set([None])


def end_request_lease(token: contextvars.Token) -> None:
    """Drops the request's lease: pins of handles nobody opened are released."""
    slot = _request_lease.get()
    if slot is not None:
        slot[0] = None
    _request_lease.reset(token)


def _lease(context: dict) -> Any:
    slot = _request_lease.get()
    if slot is not None:
        if slot[0] is None:
            slot[0] = _serialize.new_lease()
        return slot[0]
    sender = context["sender"]  # the comm's own handshake dict: lives with the comm
    lease = sender.get(_LEASE_KEY)
    if lease is None:
        lease = sender[_LEASE_KEY] = _serialize.new_lease()
    return lease


# --- the handshake ---------------------------------------------------------------

_original_handshake_info: Callable | None = None


def _patch_handshake() -> None:
    global _original_handshake_info
    if _original_handshake_info is not None:
        return
    original = _original_handshake_info = Comm.handshake_info

    def handshake_info(self: Comm) -> dict[str, Any]:
        info = original(self)
        # A comm that does not deserialize (the scheduler's) would pass
        # handles on without opening them: it never gets any.
        if _state["identity"] is not None and getattr(self, "deserialize", True):
            info[HANDSHAKE_KEY] = _state["identity"]
        return info

    Comm.handshake_info = handshake_info

    send_recv = distributed.core.send_recv

    async def send_recv_then_release(*args: Any, **kwargs: Any) -> Any:
        comm = kwargs["comm"] if "comm" in kwargs else args[0]
        try:
            return await send_recv(*args, **kwargs)
        finally:
            # The peer replied, so it has deserialized the request (or the
            # comm broke): nothing it was sent is still on its way.
            if kwargs.get("reply", True):
                release_lease(comm)

    distributed.core.send_recv = send_recv_then_release


# --- the serializers -----------------------------------------------------------------


_nbytes = _frames.nbytes


def _eligible(obj: Any, context: dict | None) -> bool:
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        return False
    threshold = _state["threshold"]
    return threshold is not None and same_memory(context) and _nbytes(obj) >= threshold


def _wrap(cls: type) -> None:
    """Registers memshare's (de)serializer for ``cls``, falling back to Dask's."""
    try:
        dask_dumps = dask_serialize.dispatch(cls)  # also runs Dask's lazy registration
        dask_loads = dask_deserialize.dispatch(cls)
    except TypeError:
        dask_dumps = dask_loads = None
    if getattr(dask_dumps, "_memshare", False):
        return
    dumps_wants_context = dask_dumps is not None and has_keyword(dask_dumps, "context")

    def dumps(obj: Any, context: dict | None = None) -> tuple[dict, list]:
        if _eligible(obj, context):
            return {_HEADER_KEY: 1}, [_serialize.dumps(obj, _lease(context))]
        if dask_dumps is None:
            raise NotImplementedError  # Dask's next family (pickle, protocol 5)
        if dumps_wants_context:
            return dask_dumps(obj, context=context)
        return dask_dumps(obj)

    def loads(header: dict, frames: list) -> Any:
        if header.get(_HEADER_KEY):
            return _serialize.loads(frames[0])
        if dask_loads is None:  # pragma: no cover - our dumps never sends this
            raise TypeError(f"memshare.dask: no deserializer for {cls.__name__}")
        return dask_loads(header, frames)

    dumps._memshare = True  # type: ignore[attr-defined]
    dask_serialize.register(cls)(dumps)
    dask_deserialize.register(cls)(loads)


def _frame_types(package: str) -> list[type]:
    mod = sys.modules[package]
    if package == "pandas":
        return [mod.DataFrame, mod.Series, mod.Index]
    if package == "pyarrow":
        return [mod.Table, mod.RecordBatch, mod.Array, mod.ChunkedArray]
    return [mod.DataFrame, mod.Series]  # polars


def _install_package(package: str) -> None:
    """Dask's registrations for ``package`` (if any), then memshare's over them."""
    previous = [d._lazy.pop(package, None) for d in (dask_serialize, dask_deserialize)]
    for register in previous:
        if register is not None:
            register()
    for cls in _frame_types(package):
        _wrap(cls)


def _register_argument() -> None:
    """A scattered Pool/Executor argument: by handle like its object, else pickled."""
    from ._args import SharedArgument

    def dumps(arg: SharedArgument, context: dict | None = None) -> tuple[dict, list]:
        threshold = _state["threshold"]
        if (
            threshold is not None
            and arg.nbytes >= threshold
            and same_memory(context)
            and not (isinstance(arg.obj, np.ndarray) and arg.obj.dtype.hasobject)
        ):
            frame = _serialize.dumps(arg.obj, _lease(context))
            return {_HEADER_KEY: 1, "nbytes": arg.nbytes}, [frame]
        raise NotImplementedError  # pickled by Dask (protocol 5)

    def loads(header: dict, frames: list) -> SharedArgument:
        return SharedArgument(_serialize.loads(frames[0]), header["nbytes"])

    dask_serialize.register(SharedArgument)(dumps)
    dask_deserialize.register(SharedArgument)(loads)


def _register_serializers() -> None:
    _register_argument()
    _wrap(np.ndarray)
    for package in ("pandas", "pyarrow", "polars"):
        if package in sys.modules:
            _install_package(package)
        else:  # when Dask first meets one of its types (importing memshare imports none)
            for dispatch in (dask_serialize, dask_deserialize):
                dispatch.register_lazy(package)(functools.partial(_install_package, package))
