"""Progress bars over the tasks of a call (tqdm when installed)."""

from __future__ import annotations

import sys
import time
from typing import Any


class _TextProgress:
    """A minimal progress line on stderr when tqdm is not installed."""

    def __init__(self, total: int | None):
        self.total, self.n, self._last = total, 0, 0.0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last > 0.2 or self.n == self.total:
            self._last = now
            total = "?" if self.total is None else self.total
            sys.stderr.write(f"\r{self.n}/{total} tasks")
            sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()


def _make_progress(progress: Any, total: int | None) -> tuple[Any, bool]:
    """(bar, owned): a bar for ``total`` tasks; ``owned`` bars are closed by us."""
    if progress is None or progress is False:
        return None, False
    if progress is True:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return _TextProgress(total), True
        return tqdm(total=total), True
    if hasattr(progress, "update"):
        return progress, False  # a bar the caller made: theirs to close
    if callable(progress):  # a tqdm-like class
        return progress(total=total), True
    raise TypeError("progress must be True, False, a tqdm-like bar or a bar class")
