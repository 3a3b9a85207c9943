"""Callables defined in ``__main__`` (a notebook, ``python -c``, a REPL) for
children that do not have them.

The standard library pickles functions and classes by reference: a module
name and a qualified name, looked up again in the child. A child started by
spawn or forkserver re-imports the parent's ``__main__`` only when it is a
file (a script, ``python -m``); a notebook's, a REPL's or ``python -c``'s
``__main__`` has no file, so the child finds nothing there, and a lambda or a
function defined inside another is found nowhere. Such callables are pickled
by value here, with cloudpickle (as loky and Ray do): their code, the globals
they use and their closures travel with them. Everything a child can import
still goes by reference, so only what must change does.

Under fork the children have the parent's ``__main__`` as it was when they
were forked, so its top-level functions and classes keep going by reference,
as in the standard library (a pool's workers see the notebook as it was when
the pool was made).

A function of ``__main__`` sent by value is rebuilt in the receiver's
``__main__`` namespace, and the globals it uses are added there unless the
receiver already has them, as a forked child would: an initializer that sets
a global (``global model; model = load()``) and the tasks that read it share
one namespace per worker, as they do under fork and in a script. (cloudpickle
alone gives each unpickled function a namespace of its own.)

:class:`Pickler` is the pickler of everything memshare sends to a child;
memshare's own picklers subclass it and add shared memory in their
``reducer_override``.
"""

from __future__ import annotations

import copyreg
import io
import os
import pickle
import sys
import types
from multiprocessing.reduction import ForkingPickler
from typing import Any

import cloudpickle

#: cloudpickle's own reducers (its class-level table is a ChainMap of them
#: and copyreg's).
_CLOUDPICKLE_REDUCERS = cloudpickle.Pickler.dispatch_table.maps[0]

__all__ = [
    "Pickler",
    "by_reference",
    "by_value",
    "dumps",
    "main_by_reference",
    "main_is_reimported",
    "portable",
]


def main_is_reimported() -> bool:
    """True if spawn and forkserver children re-import ``__main__`` (mirrors
    ``multiprocessing.spawn.get_preparation_data`` and ``_fixup_main_*``)."""
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name is not None:
        # ``python -m pkg`` runs pkg.__main__, which children do not re-run.
        return name != "__main__" and not name.endswith(".__main__")
    path = getattr(main, "__file__", None)
    if not path:
        return False
    return os.path.splitext(os.path.basename(path))[0] != "ipython"


def main_by_reference(start_method: str | None) -> bool:
    """Whether children started with ``start_method`` can look names up in
    this process's ``__main__`` (fork: a copy of it; spawn, forkserver: only
    if they re-import it)."""
    return start_method == "fork" or main_is_reimported()


def _found(obj: Any, module: Any) -> bool:
    """True if ``module.<obj's qualified name>`` is ``obj``."""
    qualname = getattr(obj, "__qualname__", None)
    if module is None or not isinstance(qualname, str):
        return False
    target = module
    for part in qualname.split("."):
        if part == "<locals>":
            return False
        target = getattr(target, part, None)
        if target is None:
            return False
    return target is obj


def by_reference(obj: Any, main_by_ref: bool) -> bool:
    """True if pickling ``obj`` (a function or class) by reference works in
    the receiving process; ``main_by_ref`` as from :func:`main_by_reference`."""
    module_name = getattr(obj, "__module__", None)
    if not isinstance(module_name, str):
        return False
    if module_name == "__main__" and not main_by_ref:
        return False
    return _found(obj, sys.modules.get(module_name))


class Pickler(cloudpickle.Pickler):
    """multiprocessing's pickler (every reducer registered with
    ``ForkingPickler`` applies) that pickles functions and classes by value
    where the receiver could not find them by reference.

    Args:
        file: where to write.
        protocol: the pickle protocol (default: the highest).
        main_by_ref: whether the receiver can look up this process's
            ``__main__`` (see :func:`main_by_reference`). True is right in a
            child sending back to its parent: what came by value is not found
            in a child's ``__main__`` and goes back by value.
        buffer_callback: as for ``pickle.Pickler``.
    """

    # Subclasses that override reducer_override call ours only for these
    # (one Python call less per object for everything else).
    CALLABLES = (types.FunctionType, type)

    def __init__(
        self,
        file: io.BytesIO,
        protocol: int | None = pickle.HIGHEST_PROTOCOL,
        *,
        main_by_ref: bool = True,
        buffer_callback: Any = None,
    ):
        # A dict, as ForkingPickler builds it for each pickler (the C pickler
        # looks every object's type up in it; cloudpickle's ChainMap costs a
        # Python call and a KeyError each): copyreg's reducers, then
        # cloudpickle's (code objects, cells, ...), then ForkingPickler's
        # (connections, sockets, shared arrays, frames), the last winning.
        # The C pickler reads it once, in __init__, through the property.
        table = dict(copyreg.dispatch_table)
        table.update(_CLOUDPICKLE_REDUCERS)
        table.update(ForkingPickler._extra_reducers)
        self._table = table
        super().__init__(file, protocol, buffer_callback=buffer_callback)
        self._main_by_ref = main_by_ref

    @property
    def dispatch_table(self) -> dict:
        return self._table

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, Pickler.CALLABLES):
            if by_reference(obj, self._main_by_ref):
                return NotImplemented  # pickle's own save_global
            return super().reducer_override(obj)  # cloudpickle: by value
        return NotImplemented

    def _dynamic_function_reduce(self, func: types.FunctionType) -> tuple:
        # cloudpickle's reduction of a function by value, rebuilt in the
        # receiver's __main__ if it lives in ours.
        rv = super()._dynamic_function_reduce(func)
        if func.__globals__ is not _main_globals():
            return rv
        make, newargs, state, listitems, dictitems, _setter = rv
        newargs = (newargs[0], _MAIN_GLOBALS, *newargs[2:])
        return (make, newargs, state, listitems, dictitems, _set_function_state)


def _main_globals() -> dict:
    return sys.modules["__main__"].__dict__


class _MainGlobals:
    """Pickles as "the receiver's ``__main__`` namespace"."""

    def __reduce__(self):
        return (_main_globals, ())


_MAIN_GLOBALS = _MainGlobals()
_MISSING = object()


def _set_function_state(func: types.FunctionType, state: tuple) -> None:
    """cloudpickle's function state setter for a function rebuilt in the
    receiver's ``__main__``: its globals are added only where missing."""
    state, slotstate = state
    namespace = func.__globals__
    for name, value in slotstate.pop("__globals__").items():
        namespace.setdefault(name, value)
    slotstate["__globals__"] = {}
    builtins = namespace.get("__builtins__", _MISSING)
    _cloudpickle_set_function_state(func, (state, slotstate))
    if builtins is not _MISSING:  # cloudpickle sets its own module's
        namespace["__builtins__"] = builtins


# The private parts of cloudpickle used here: this, the state format that
# _set_function_state reads, _dynamic_function_reduce's result and the
# reducer table above (tests/test_process.py runs them all).
_cloudpickle_set_function_state = cloudpickle.cloudpickle._function_setstate


def dumps(obj: Any, *, main_by_ref: bool = True) -> bytes:
    """Pickles ``obj`` with :class:`Pickler`; ``pickle.loads`` reads it."""
    f = io.BytesIO()
    Pickler(f, main_by_ref=main_by_ref).dump(obj)
    return f.getvalue()


class _ByValue:
    """Wraps a value so that it pickles with :class:`Pickler`, also inside a
    pickle made by the standard library's ``ForkingPickler``; unpickling gives
    back the value itself, not the wrapper."""

    __slots__ = ("main_by_ref", "value")

    def __init__(self, value: Any, main_by_ref: bool):
        self.value = value
        self.main_by_ref = main_by_ref

    def __reduce__(self):
        return (pickle.loads, (dumps(self.value, main_by_ref=self.main_by_ref),))


def by_value(value: Any, main_by_ref: bool = True) -> Any:
    """A wrapper of ``value`` that pickles it with :class:`Pickler`, also
    inside the standard library's pickles, and unpickles to ``value``."""
    return _ByValue(value, main_by_ref)


def portable(value: Any, main_by_ref: bool) -> Any:
    """``value`` itself if the standard library can pickle it by reference
    (an importable function or class, or anything else: data), else a wrapper
    that pickles it by value and unpickles to it."""
    if isinstance(value, (types.FunctionType, type)) and not by_reference(value, main_by_ref):
        return _ByValue(value, main_by_ref)
    return value
