"""pandas, pyarrow and polars objects in shared memory.

Every supported object is taken apart into a *spec*: nested tuples of small
metadata (dtypes, names, placements) and numpy arrays, one array per data
buffer. The same kind of object is then rebuilt over those arrays without
copying them.

* :func:`share_frame` maps every array of the spec through ``share_array``
  (one copy into shared memory) and rebuilds the object locally, so the result
  is an object of the same type whose buffers all live in shared memory.
* The reducers installed by :func:`register_reducers` pickle an object as
  ``(_rebuild, (spec,))``. The arrays in the spec lie in shared memory, so the
  core's ndarray reducer pickles each of them as a small handle, and the
  receiver rebuilds the object over the same memory (zero-copy).

What is *not* a numpy buffer:

* Strings in ``object`` columns (and pandas' python-backed ``string`` dtype)
  are stored as Arrow ``large_string`` buffers (int64 offsets, UTF-8 data,
  validity bitmap) and turned back into Python ``str`` objects on rebuild.
* ``object`` columns holding anything other than strings and one kind of
  missing value are pickled in-band with the spec (a documented exception).
* Extension arrays this module does not know are pickled with protocol 5;
  their out-of-band buffers become arrays of the spec, the in-band rest travels
  with the spec.

pandas frames rebuilt here are *snapshots*: every block is marked as
referenced, so pandas' Copy-on-Write copies a block (for a single-cell write,
just that column) before any write instead of writing into shared memory. The
arrays are handed to ``share_array`` with ``readonly=True``, so code that
bypasses pandas fails loudly instead of changing what other processes see.

pandas, pyarrow and polars are optional: nothing here imports them unless an
object of theirs is being handled.

Modules, one job each:

* ``_spec``: spec nodes, the rebuild registry, optional imports.
* ``_pandas``, ``_arrow``, ``_polars``: each library's objects to specs and back.
* ``_objects``: ``object`` arrays (the strings codec) and the pickle-5 fallback.
* ``_dispatch``: which objects are handled; :func:`share_frame`, :func:`reduce_frame`.
* ``_install``: the pickling reducers and the import hook that registers them.
"""

from __future__ import annotations

from ._dispatch import handled_type, nbytes, reduce_frame, share_frame
from ._install import install, register_reducers, register_reducers_on_import

__all__ = [
    "handled_type",
    "install",
    "nbytes",
    "reduce_frame",
    "register_reducers",
    "register_reducers_on_import",
    "share_frame",
]
