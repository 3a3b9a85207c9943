"""memshare's exceptions, defined in Python so that they pickle like any
other exception (a worker's error reaches the parent with its type and
message). The Rust bindings raise these classes; ``memshare`` re-exports them.
"""

from __future__ import annotations

__all__ = ["CorruptSegmentError", "HandleError", "SharedMemoryError", "StaleHandleError"]


class HandleError(ValueError):
    """Handle bytes that memshare cannot use: forged, truncated, foreign or from another version."""


class StaleHandleError(HandleError):
    """A handle to shared memory that has been freed: every process dropped the object."""


class CorruptSegmentError(ValueError):
    """A file with a memshare name that is not a valid memshare segment."""


class SharedMemoryError(MemoryError):
    """Shared memory is exhausted: the arena limit, the file system's space or the pin table."""


# Shown (and pickled) under the public name, e.g. ``memshare.HandleError``.
for _cls in (HandleError, StaleHandleError, CorruptSegmentError, SharedMemoryError):
    _cls.__module__ = "memshare"
del _cls
