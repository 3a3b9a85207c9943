"""pyarrow: arrays, chunked arrays, tables and record batches."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from ._objects import _enc_pickle5
from ._spec import _REBUILD, Leaf, _rebuild, _require


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


_REBUILD.update(
    {
        "pa_array": _reb_pa_array,
        "pa_chunked": _reb_pa_chunked,
        "pa_table": _reb_pa_table,
        "pa_batch": _reb_pa_batch,
    }
)
