"""Worker health: a worker that dies fails the pending calls of its Pool.

The stdlib's worker handler thread polls ``exitcode`` of every worker;
:class:`_WatchedProcess` reports the first abnormal exit code it sees, and
:func:`_worker_exited` fails the pool's pending calls with
:class:`WorkerLostError` instead of letting them hang.
"""

from __future__ import annotations

import signal
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from .. import _native


class WorkerLostError(BrokenProcessPool):
    """A worker process of a :class:`Pool` died while calls were pending.

    Raised by every call that was pending when it happened, and by new calls:
    the pool is broken (like ``concurrent.futures``' ``BrokenProcessPool``,
    which this subclasses). Create a new pool to go on.
    """


class _Health:
    """Shared by a Pool and its worker handler thread (without referencing the
    pool, so an unclosed pool is still garbage-collected as in the stdlib)."""

    def __init__(self) -> None:
        self.cache: dict | None = None
        self.terminating = False
        # Why the pool is broken: the message, not the error the calls raise.
        # That error keeps the frames it was raised through, which hold the
        # pool: held here too, it would make the pool garbage of a cycle,
        # whose queues may be closed before the pool's __del__ runs.
        self.broken: str | None = None


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _worker_exited(health: _Health, proc: Any, code: int) -> None:
    """Called (in the worker handler thread) when a worker exits abnormally."""
    if health.terminating:
        return
    err = WorkerLostError(
        f"a worker process (pid {proc.pid}) {_describe_exit(code)}; the pool is broken "
        "and the calls that were pending failed. Create a new Pool to go on."
    )
    if health.broken is None:
        health.broken = str(err)
    for result in list((health.cache or {}).values()):
        fail = getattr(result, "_fail", None)
        if fail is not None:
            try:
                fail(err)
            except Exception:  # keep failing the others
                pass
    try:
        _native.reap()  # the dead worker's memory, now
    except Exception:
        pass


class _WatchedProcess:
    """A pool worker process that reports an abnormal exit the first time the
    pool's worker handler looks at its exit code."""

    __slots__ = ("_health", "_proc", "_reported")

    def __init__(self, proc: Any, health: _Health):
        object.__setattr__(self, "_proc", proc)
        object.__setattr__(self, "_health", health)
        object.__setattr__(self, "_reported", False)

    @property
    def exitcode(self) -> int | None:
        code = self._proc.exitcode
        if code not in (None, 0) and not self._reported:
            object.__setattr__(self, "_reported", True)
            _worker_exited(self._health, self._proc, code)
        return code

    def __getattr__(self, name: str) -> Any:
        return getattr(self._proc, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._proc, name, value)


def _health_of(workers: list) -> _Health | None:
    """The health of the pool these workers belong to: the stdlib's finalizer
    of a pool that was never terminated has no pool, only its workers."""
    for p in workers:
        if isinstance(p, _WatchedProcess):
            return p._health
    return None


def _make_process(health: _Health, ctx: Any, *args: Any, **kwds: Any) -> _WatchedProcess:
    return _WatchedProcess(ctx.Process(*args, **kwds), health)
