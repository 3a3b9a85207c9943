"""polars: DataFrames and Series, which travel as Arrow tables."""

from __future__ import annotations

import sys
from typing import Any

from ._arrow import _enc_arrow
from ._objects import _enc_pickle5
from ._spec import _REBUILD, Leaf, _rebuild, _require


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


_REBUILD["pl"] = _reb_polars
