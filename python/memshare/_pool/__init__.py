"""``memshare.Pool`` and ``memshare.ProcessPoolExecutor``: drop-in process pools
that move large data by handle instead of by copy.

Both are subclasses of the standard library's pools, so scheduling, chunking,
ordering, callbacks and shutdown behave exactly as documented for
``multiprocessing.pool.Pool`` and ``concurrent.futures.ProcessPoolExecutor``.
What changes is how arguments and results travel:

* Arguments of one call (``map``, ``imap``, ``apply_async``, ``submit``, ...)
  are pickled by a pickler that knows shared memory. Arrays already in shared
  memory go as handles. numpy arrays and pandas/Arrow/polars objects of at
  least ``share_threshold`` bytes, wherever they sit in the arguments (tuples,
  dicts, attributes of ``self`` of a bound method), are copied into shared
  memory once per call and then go as handles: the generator of ``(df, i)``
  tuples shares ``df`` once. Workers receive such copies as copy-on-write
  views: writing into an argument changes only that task's copy (as with
  arguments pickled by value), and only the pages written are copied.
* Workers run with numpy's allocator hook on (see ``_allocator``): arrays of
  at least ``share_threshold`` bytes they create are born in shared memory,
  and a result that is (or contains) such an array travels back by handle.
  Large results that are not in shared memory are copied there once.
* Handles of a call are pinned by the call's ``Lease``, so a task that never
  reaches a worker (terminate, a dead worker) releases its pins when the call
  ends; memory held by a dead worker is reclaimed at once.
* What travels by handle, and the one ``share_threshold`` default, are
  decided by ``memshare._sharing`` (``reduce_call_argument``,
  ``reduce_task_result``, ``share_task_result``), as for every transport.

Failures: an exception in a task is re-raised in the parent with the worker's
traceback as its ``__cause__``. A worker that dies (SIGKILL, segfault, the OOM
killer) makes every pending call of a ``Pool`` raise :class:`WorkerLostError`
promptly instead of hanging, and marks the pool broken (a dead worker may have
held the task queue's lock); ``ProcessPoolExecutor`` raises ``BrokenProcessPool``
as the standard library does. Workers ignore SIGINT: on Ctrl-C the parent's
``KeyboardInterrupt`` propagates and terminating the pool stops them.

Modules, one job each:

* ``_stdlib``: every access to CPython's private multiprocessing names (with
  a self check run by the tests on each supported CPython version).
* ``_config``: the ``share_threshold`` default and check, the copy counters.
* ``_arguments``: the parent side, what of a call's arguments travels by
  handle (``_CallState``).
* ``_worker``: worker setup and the functions tasks run.
* ``_packing``: results pickled in the worker and unpickled in the parent.
* ``_results``: the ``Pool``'s result objects.
* ``_health``: a dead worker fails the pending calls (``WorkerLostError``).
* ``_progress``: progress bars.
* ``_pool`` and ``_executor``: the two pools.
"""

from __future__ import annotations

import multiprocessing.util
import os

from ._config import DEFAULT_SHARE_THRESHOLD, counters
from ._executor import ProcessPoolExecutor
from ._health import WorkerLostError
from ._pool import Pool

__all__ = [
    "DEFAULT_SHARE_THRESHOLD",
    "Pool",
    "ProcessPoolExecutor",
    "WorkerLostError",
    "counters",
]

if os.environ.get("MEMSHARE_POOL_DEBUG"):  # pragma: no cover
    multiprocessing.util.log_to_stderr()
