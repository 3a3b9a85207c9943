"""Specs: frame-like objects taken apart into metadata and numpy buffers.

A spec node is a tuple whose first item is a tag naming its rebuild function
in :data:`_REBUILD` (each library module registers its own tags). ``leaf``
maps every numpy data buffer (identity when pickling, ``share_array`` when
sharing). ``local`` lets a node carry objects that are only used by a rebuild
in this same process (never pickled).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

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


def _identity(arr: np.ndarray) -> np.ndarray:
    return arr


#: tag -> rebuild function, filled by the library modules.
_REBUILD: dict[str, Callable[[tuple], Any]] = {}


def _rebuild(spec: tuple) -> Any:
    """Rebuild the object a spec describes (pickle's reconstructor)."""
    return _REBUILD[spec[0]](spec)


def _plain(arr: np.ndarray) -> np.ndarray:
    """A base-class view of a shared array for pandas to hold.

    pandas would keep an ndarray subclass in its blocks and propagate it to
    the results of arithmetic on the frame, which live in private memory;
    a plain view keeps the memory alive through ``.base`` and pickles through
    the core's reducer for ndarrays over shared memory.
    """
    return arr if type(arr) is np.ndarray else arr.view(np.ndarray)


_REBUILD["nd"] = lambda spec: _plain(spec[1])
_REBUILD["nd_view"] = lambda spec: _plain(spec[1]).view(spec[2])
