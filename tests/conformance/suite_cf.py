"""CPython's concurrent.futures process pool tests (the
``test.test_concurrent_futures`` package of CPython 3.13) for one start
method, against the stock library or memshare's drop-in.

Configured by the environment as ``suite_mp``.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import os

IMPL = os.environ.get("MEMSHARE_CONFORMANCE_IMPL", "stock")
START = os.environ.get("MEMSHARE_CONFORMANCE_START", "fork")

if IMPL == "memshare":
    # Before the tests are imported: their mixins bind it at import.
    import memshare

    concurrent.futures.ProcessPoolExecutor = memshare.ProcessPoolExecutor

MODULES = [
    "test_process_pool",
    "test_wait",
    "test_as_completed",
    "test_shutdown",
    "test_deadlock",
    "test_init",
]
_MIXIN_PREFIX = {
    "fork": "ProcessPoolFork",
    "spawn": "ProcessPoolSpawn",
    "forkserver": "ProcessPoolForkserver",
}[START]

modules = {
    name: importlib.import_module(f"test.test_concurrent_futures.{name}") for name in MODULES
}


def classes() -> list[tuple[object, type]]:
    """(module, class) of every process pool test class for this start method."""
    found = []
    for module in modules.values():
        for name, obj in sorted(vars(module).items()):
            if not isinstance(obj, type) or not name.startswith(_MIXIN_PREFIX):
                continue
            # ProcessPoolFork... must not also take ProcessPoolForkserver...
            if START == "fork" and name.startswith("ProcessPoolForkserver"):
                continue
            found.append((module, obj))
    if START == "spawn":  # runs its own spawn and forkserver pools
        found.append((modules["test_init"], modules["test_init"].FailingInitializerResourcesTest))
    return found
