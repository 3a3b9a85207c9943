"""Pickling reducers for handled types, registered now for imported packages
and by an import hook for the others."""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from ._dispatch import _encode
from ._spec import _PACKAGES, _identity, _rebuild, _require


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

    from .. import _array

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
