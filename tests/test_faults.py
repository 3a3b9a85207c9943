"""Crash safety and hostile input of the arena itself: killed processes,
exhausted memory, small /dev/shm, foreign files, other users."""

from __future__ import annotations

import gc
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest

import memshare as ms
from memshare import _native

TIMEOUT = 120


def run_python(code: str, env_extra: dict[str, str], timeout: float = TIMEOUT):
    env = {k: v for k, v in os.environ.items() if k not in ("MEMSHARE_ARENA", "MEMSHARE_LIMIT")}
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout
    )


# --- memory limits -------------------------------------------------------------


def test_limit_from_environment_gives_memory_error_with_sizes():
    code = (
        "import numpy as np, memshare as ms\n"
        "try:\n"
        "    ms.share(np.ones(50_000_000))\n"
        "except MemoryError as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    out = run_python(code, {"MEMSHARE_LIMIT": "64M"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("SharedMemoryError"), out.stdout
    assert "381.5 MiB" in out.stdout and "limit 64.0 MiB" in out.stdout
    assert "MEMSHARE_LIMIT" in out.stdout


def test_an_empty_memshare_dir_means_the_default():
    """Like the other switches' empty values: unset, so /dev/shm (it failed
    with an empty path in its message)."""
    code = (
        "import numpy as np, memshare as ms\n"
        "a = ms.share(np.arange(10.0))\n"
        "print(ms._native.shm_dir(), float(a.sum()))\n"
    )
    out = run_python(code, {"MEMSHARE_DIR": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["/dev/shm", "45.0"], out.stdout


def test_set_limit_applies_to_the_arena():
    ms.share(np.ones(10))  # make sure the arena exists
    ms.set_limit(ms.stats()["bytes_reserved"])
    try:
        with pytest.raises(MemoryError, match="set_limit"):
            ms.empty(1 << 30)
        small = ms.empty(100)  # what fits still works
        del small
    finally:
        ms.set_limit(None)
    assert ms.stats()["limit"] is None


@pytest.fixture
def small_tmpfs():
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path = Path(tempfile.mkdtemp(prefix="memshare-small-shm-"))
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)])
    if res.returncode != 0:
        path.rmdir()
        pytest.skip("this machine cannot mount a tmpfs")
    yield path
    subprocess.run(["umount", str(path)], check=True)
    path.rmdir()


def test_small_dev_shm_gives_memory_error_not_sigbus(small_tmpfs):
    # Beyond the tmpfs, segments are memory-backed (tests/test_storage.py);
    # beyond the machine's memory too, the error names both and the fixes.
    code = (
        "import os, numpy as np, memshare as ms\n"
        "a = ms.share(np.ones(1_000_000))\n"  # 8 MB fits
        "too_much = 4 * os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')\n"
        "try:\n"
        "    ms.empty(too_much // 8)\n"
        "except MemoryError as e:\n"
        "    print(e)\n"
        "print('sum', a.sum())\n"
    )
    out = run_python(code, {"MEMSHARE_DIR": str(small_tmpfs)})
    assert out.returncode == 0, (out.returncode, out.stderr)
    assert str(small_tmpfs) in out.stdout and "--shm-size" in out.stdout, out.stdout
    assert "container" in out.stdout, out.stdout
    assert "sum 1000000.0" in out.stdout
    assert not list(small_tmpfs.iterdir()), "the process removed its arena at exit"


# --- hostile input -------------------------------------------------------------


def test_foreign_file_with_memshare_name_is_refused():
    a = ms.share(np.arange(10))
    raw = bytearray(ms.dumps(a))
    ms.loads(bytes(raw))  # adopt the pin
    fake_token = uuid.uuid4().hex
    fake = Path(_native.shm_dir()) / f"memshare-{fake_token}"
    fake.write_bytes(os.urandom(3 << 20))
    fake.chmod(0o600)
    try:
        # Point the first table entry's handle at it (header 16 B, entry
        # length 4 B, then the handle, whose token is at byte 8).
        raw[28:44] = bytes.fromhex(fake_token)
        with pytest.raises(ValueError):
            ms.loads(bytes(raw))
        listing = {x["token"]: x for x in _native.list_arenas()}
        assert "error" in listing[fake_token] and "refusing" in listing[fake_token]["error"]
        assert fake_token in _native.collect_garbage()
        assert not fake.exists()
    finally:
        fake.unlink(missing_ok=True)


def test_another_user_cannot_attach():
    if os.geteuid() != 0:
        pytest.skip("switching users needs root")
    a = ms.share(np.arange(1000))
    message = ms.dumps(a)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: become nobody, then try to open the handle
        os.close(r)
        code = 1
        try:
            _native.shutdown()  # forget what fork inherited: attach afresh
            os.setgid(65534)
            os.setuid(65534)
            try:
                ms.loads(message)
                os.write(w, b"attached")
            except PermissionError as e:
                os.write(w, b"PermissionError " + str(e).encode())
            except Exception as e:
                os.write(w, repr(e).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    ready, _, _ = select.select([r], [], [], TIMEOUT)
    assert ready, "the child did not answer"
    with os.fdopen(r, "rb") as f:
        result = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert result.startswith("PermissionError"), result
    ms.loads(message)  # adopt the pin ourselves


# --- killed processes ------------------------------------------------------------

CHURN = """
import os, sys, numpy as np, memshare as ms, pickle
arrays = [ms.loads(bytes.fromhex(line)) for line in sys.argv[1:]]
rng = np.random.default_rng(os.getpid())
held = []
print("ready", flush=True)
while True:  # allocate, pin, free and hold at random until killed
    n = int(rng.integers(1, 2_000_000))
    a = ms.empty(n // 8 + 1)
    if rng.random() < 0.5:
        held.append(a)
    if rng.random() < 0.3:
        ms.dumps(a)  # a pin that will never be adopted
    if len(held) > 20:
        held.pop(int(rng.integers(0, len(held))))
    for x in arrays:
        x[0] += 1
"""


@pytest.mark.parametrize("seed", range(12))
def test_random_kills_of_a_churning_process_leave_nothing(seed):
    """SIGKILL at random instants, also inside the arena mutex; the survivor
    repairs the metadata and every byte comes back."""
    rng = random.Random(seed)
    shared = ms.zeros(10)
    before = ms.stats()
    p = subprocess.Popen(
        [sys.executable, "-c", CHURN, ms.dumps(shared).hex()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout.readline().strip() == "ready"
    # Let it run a random number of iterations, observed through its writes.
    target = rng.randint(1, 3000)
    while shared[0] < target and p.poll() is None:
        ms.empty(rng.randint(1, 1 << 20))  # contend for the mutex meanwhile
    p.send_signal(signal.SIGKILL)
    _, err = p.communicate(timeout=TIMEOUT)
    assert p.returncode == -signal.SIGKILL, err
    ms.reap()
    gc.collect()
    after = ms.stats()
    assert after["live_blocks"] == before["live_blocks"]
    assert after["bytes_in_use"] == before["bytes_in_use"]
    assert after["pins"] == before["pins"] and after["processes"] == 1
    # The memory is reusable and intact.
    check = ms.share(np.arange(100_000))
    assert check.sum() == sum(range(100_000))
    assert shared[0] >= target
    del check


def test_reaping_happens_by_itself_at_next_allocation():
    p = subprocess.Popen(
        [sys.executable, "-c", CHURN],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=TIMEOUT)
    # No explicit reap: allocations notice the dead process within a second.
    import time

    deadline = time.monotonic() + 30
    while ms.stats()["processes"] > 1 and time.monotonic() < deadline:
        ms.empty(10)  # each allocation checks for the dead once a second
    assert ms.stats()["processes"] == 1


def test_handle_from_killed_sender_is_stale_not_corrupt():
    code = (
        "import numpy as np, memshare as ms, pickle, sys, os\n"
        "a = ms.share(np.arange(1000.0))\n"
        "sys.stdout.write(ms.dumps(a).hex() + '\\n'); sys.stdout.flush()\n"
        "os.kill(os.getpid(), 9)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MEMSHARE_ARENA"}
    env["MEMSHARE_ARENA"] = _native.arena_token()
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=TIMEOUT
    )
    assert out.returncode == -signal.SIGKILL
    ms.reap()
    with pytest.raises(ms.StaleHandleError):
        ms.loads(bytes.fromhex(out.stdout.strip()))
