"""CPython's multiprocessing tests (``test._test_multiprocessing``) for one
start method, against the stock library or memshare's drop-ins.

Importable (spawn and forkserver children import it to find the test
classes), configured by the environment so that children patch as the parent
did: ``MEMSHARE_CONFORMANCE_IMPL`` (``stock`` or ``memshare``) and
``MEMSHARE_CONFORMANCE_START`` (``fork``, ``spawn``, ``forkserver``).
"""

from __future__ import annotations

import multiprocessing
import os

IMPL = os.environ.get("MEMSHARE_CONFORMANCE_IMPL", "stock")
START = os.environ.get("MEMSHARE_CONFORMANCE_START", "fork")

if IMPL == "memshare":
    # Before the test module is imported: its mixins bind these at import.
    import memshare

    multiprocessing.Pool = memshare.Pool
    multiprocessing.Queue = memshare.Queue
    multiprocessing.JoinableQueue = memshare.JoinableQueue

from test import _test_multiprocessing  # noqa: E402

_test_multiprocessing.install_tests_in_module_dict(globals(), START)

#: The test classes this suite runs (Pool, Queue and JoinableQueue, initializers).
CLASSES = [
    "WithProcessesTestPool",
    "WithProcessesTestPoolWorkerErrors",
    "WithProcessesTestPoolWorkerLifetime",
    "WithProcessesTestQueue",
    "TestInitializers",
]
