"""The pools' adapter for CPython's private multiprocessing names holds on
every supported CPython version (it imports only the stdlib, so it runs
without memshare installed)."""

from __future__ import annotations

import multiprocessing as mp
import os
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from memshare._pool import _stdlib

ADAPTER = Path(_stdlib.__file__)
PYENV_ROOT = Path.home() / ".pyenv" / "versions"
VERSIONS = ["3.10", "3.11", "3.12", "3.13"]


def _interpreter(version: str) -> Path:
    found = sorted(PYENV_ROOT.glob(f"{version}.*/bin/python{version}"))
    assert found, f"no CPython {version} under {PYENV_ROOT} (pyenv install {version})"
    return found[-1]


def test_adapter_self_check_here():
    _stdlib.self_check()


@pytest.mark.parametrize("version", VERSIONS)
def test_adapter_self_check_on_cpython(version):
    out = subprocess.run(
        [str(_interpreter(version)), "-I", str(ADAPTER)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "memshare stdlib adapter: ok"


PRIVATE_NAMES = [
    "._taskqueue",
    "._cache",
    "._outqueue",
    "._inqueue",
    "._worker_handler",
    "._quick_get",
    "._get_tasks",
    "_helper_reraises_exception",
    "._event",
    "._items",
    "._number_left",
    "._cond",
    "._job",
    "._pool =",
    "._pool)",
    "concurrent.futures.process._",
]


def test_only_the_adapter_touches_private_stdlib_names():
    package = ADAPTER.parent
    offenders = []
    for path in sorted(package.glob("*.py")):
        if path == ADAPTER:
            continue
        text = path.read_text()
        offenders += [f"{path.name}: {name}" for name in PRIVATE_NAMES if name in text]
    assert offenders == []


# --- the pool's task queue ---------------------------------------------------------

T = 60  # seconds: the bound of every blocking call


class _LetGo:
    """The ``let_go`` of a test's task queue: who called it, and when first."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.called = threading.Event()

    def __call__(self) -> None:
        self.calls.append(threading.current_thread().name)
        self.called.set()


def _holding_queue() -> tuple[_stdlib.TaskQueue, _LetGo]:
    let_go = _LetGo()
    queue = _stdlib.TaskQueue(ctx=mp.get_context("fork"), holding=lambda: True, let_go=let_go)
    return queue, let_go


def _until_it_sleeps_on_a_futex(thread: threading.Thread) -> None:
    """Until ``thread`` sleeps in the kernel on a futex (a lock, here) twice in
    a row, while this thread lets it have the GIL: then it waits for the lock,
    not for the GIL."""
    wchan = Path(f"/proc/self/task/{thread.native_id}/wchan")
    seen, pause = 0, threading.Event()
    for _ in range(T * 1000):
        seen = seen + 1 if wchan.read_text().startswith("futex") else 0
        if seen == 2:
            return
        pause.wait(0.001)
    raise AssertionError("the getter never waited for the lock")


def _get_in_thread(queue: _stdlib.TaskQueue) -> tuple[threading.Thread, list]:
    got: list = []
    # A daemon: a failed test must not leave the interpreter waiting for it.
    thread = threading.Thread(target=lambda: got.append(queue.get()), name="getter", daemon=True)
    thread.start()
    return thread, got


@pytest.mark.parametrize("patience", [0.0, T])
def test_a_holding_worker_lets_go_only_when_the_read_lock_stays_held(monkeypatch, patience):
    # Another worker holds the read lock for a moment as it takes a task: a
    # worker that waits for it no longer than READ_LOCK_PATIENCE keeps what it
    # holds. One that waits longer lets go before it goes on waiting.
    monkeypatch.setattr(_stdlib, "READ_LOCK_PATIENCE", patience)
    queue, let_go = _holding_queue()
    queue.put("task")  # there is a task: only the lock can make it wait
    assert queue._rlock.acquire(timeout=T)
    locked = True
    try:
        thread, got = _get_in_thread(queue)
        if patience == 0.0:
            assert let_go.called.wait(T), "the worker did not let go while the lock stayed held"
        else:
            _until_it_sleeps_on_a_futex(thread)
        queue._rlock.release()
        locked = False
        thread.join(T)
        assert got == ["task"]
        assert let_go.calls == (["getter"] if patience == 0.0 else [])
    finally:
        if locked:
            queue._rlock.release()
        queue.close()


def test_a_holding_worker_lets_go_before_it_waits_for_a_task():
    queue, let_go = _holding_queue()
    try:
        thread, got = _get_in_thread(queue)
        assert let_go.called.wait(T), "the worker waits for a task without letting go"
        queue.put("task")
        thread.join(T)
        assert got == ["task"] and let_go.calls == ["getter"]
    finally:
        queue.close()


def test_draining_the_task_queue_survives_a_message_cut_short():
    """A worker killed between a task's length header and its body (or in
    the body) leaves the task pipe between two messages: the next read takes
    body bytes for a length. Terminating drains that pipe while the task
    handler runs; reading it by messages then waited forever for bytes that
    never come (seen once: test_pool_worker_killed[33] hung in terminate)."""
    queue = mp.get_context("fork").SimpleQueue()
    writer = queue._writer
    # A length of 16 MiB with 100 bytes of its body: what is left of a pipe
    # when a reader took the bytes before them.
    writer.send_bytes(b"x" * 100)  # a whole message first
    os.write(writer.fileno(), struct.pack("!i", 1 << 24) + b"y" * 100)
    handler_may_stop = threading.Event()
    task_handler = threading.Thread(target=handler_may_stop.wait, args=(60,), daemon=True)
    task_handler.start()
    drainer = threading.Thread(
        target=_stdlib.drain_task_queue,
        args=(queue, task_handler),
        kwargs={"lock_timeout": 5.0, "drain_for": 2.0},
        daemon=True,
    )
    try:
        drainer.start()
        drainer.join(30)
        assert not drainer.is_alive(), "the drain waited for the rest of a cut message"
        assert not queue._reader.poll(0), "the drain left bytes in the pipe"
    finally:
        handler_may_stop.set()
        writer.close()  # a stuck read ends with EOFError
        drainer.join(30)
        task_handler.join(30)
        queue._reader.close()
