"""Storage of the arena: limits, segment names and ownership, memory given
back to the OS, fragmentation, and memory-backed segments when the shm
directory is too small."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

TIMEOUT = 120


def run_python(code: str, env_extra: dict[str, str], timeout: float = TIMEOUT):
    env = {k: v for k, v in os.environ.items() if k not in ("MEMSHARE_ARENA", "MEMSHARE_LIMIT")}
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout
    )


# --- MEMSHARE_LIMIT ------------------------------------------------------------

LIMIT_PROBE = (
    "import numpy as np, memshare as ms\n"
    "try:\n"
    "    ms.share(np.ones(1000))\n"
    "    print('limit', ms.stats()['limit'])\n"
    "except ValueError as e:\n"
    "    print('ValueError', e)\n"
)


@pytest.mark.parametrize("value", ["lots", "-1", "1e30", "1.5x", "1.5", "8 G B", ""])
def test_bad_limit_is_a_value_error_naming_the_variable_and_forms(value):
    out = run_python(LIMIT_PROBE, {"MEMSHARE_LIMIT": value})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ValueError"), out.stdout
    assert "MEMSHARE_LIMIT" in out.stdout and "8G" in out.stdout and "512M" in out.stdout
    assert "bytes" in out.stdout


@pytest.mark.parametrize(
    ("value", "limit"),
    [("0", "None"), ("512M", str(512 << 20)), ("1.5G", str(3 << 29)), ("1048576", "1048576")],
)
def test_good_limits_are_taken_and_zero_means_none(value, limit):
    out = run_python(LIMIT_PROBE, {"MEMSHARE_LIMIT": value})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"limit {limit}", out.stdout


# --- helpers ---------------------------------------------------------------------

NOBODY = 65534


def needs_root():
    if os.geteuid() != 0:
        pytest.skip("switching users and mounting need root")


@contextlib.contextmanager
def mounted_tmpfs(mib: int):
    """A real tmpfs of ``mib`` MiB, as a container's /dev/shm is."""
    needs_root()
    path = Path(tempfile.mkdtemp(prefix="memshare-storage-tmpfs-"))
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(path)])
    if res.returncode != 0:
        path.rmdir()
        pytest.skip("this machine cannot mount a tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)
        path.rmdir()


@pytest.fixture
def tmpfs():
    with mounted_tmpfs(64) as path:
        yield path


@pytest.fixture
def tmpfs_200():
    with mounted_tmpfs(200) as path:
        yield path


@pytest.fixture
def shared_dir():
    """A world-writable directory with the sticky bit (like /dev/shm), private to the test."""
    path = Path(tempfile.mkdtemp(prefix="memshare-storage-dir-"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def last_json(out) -> dict:
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- segment names nobody can take first (item 6) ---------------------------------

SQUAT_VICTIM = """
import json, os, subprocess, numpy as np, memshare as ms
a = ms.share(np.ones(10))
d = os.environ["MEMSHARE_DIR"]
token = next(p[9:] for p in os.listdir(d) if len(p) == 9 + 32)  # memshare-<token>
# Another user takes every name a counter would give the next segments.
script = (
    f"for i in $(seq 0 64); do touch memshare-{token}-$i memshare-{token}-$i-0000000000000001; "
    f"ln -s /etc/passwd memshare-{token}-$i-link; done"
)
subprocess.run(["sh", "-c", script], cwd=d, user=65534, group=65534, check=True)
squatted = {p for p in os.listdir(d)
            if os.stat(os.path.join(d, p), follow_symlinks=False).st_uid == 65534}
# 3 MiB arrays: most get a segment of their own.
held = [ms.share(np.full(3 << 17, i, dtype=np.float64)) for i in range(40)]
ok = all(float(h[0]) == i for i, h in enumerate(held))
print(json.dumps({"squatted": len(squatted), "segments": ms.stats()["segments"], "ok": ok}))
"""


def test_squatted_segment_names_do_not_stop_growth(shared_dir):
    needs_root()
    out = run_python(SQUAT_VICTIM, {"MEMSHARE_DIR": str(shared_dir)})
    res = last_json(out)
    assert res["squatted"] >= 3 * 65, res
    assert res["segments"] >= 20 and res["ok"], res
    left = [p for p in shared_dir.iterdir() if p.lstat().st_uid != NOBODY]
    assert not left, f"the victim's arena was not removed at exit: {left}"


# --- segments are ours, not followed links, in a safe directory (item 7) ------------


def test_directory_others_can_write_without_sticky_bit_is_refused():
    d = Path(tempfile.mkdtemp(prefix="memshare-storage-open-"))
    try:
        d.chmod(0o777)
        code = (
            "import numpy as np, memshare as ms\n"
            "try:\n"
            "    ms.share(np.ones(10))\n"
            "except PermissionError as e:\n"
            "    print('PermissionError', e)\n"
        )
        out = run_python(code, {"MEMSHARE_DIR": str(d)})
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("PermissionError"), out.stdout
        assert str(d) in out.stdout and "sticky" in out.stdout, out.stdout
        assert not list(d.iterdir())
    finally:
        shutil.rmtree(d)


SWAP_VICTIM = """
import json, os, subprocess, sys, numpy as np, memshare as ms
d = os.environ["MEMSHARE_DIR"]
a = ms.share(np.arange(1 << 20, dtype=np.float64))  # 8 MiB: a segment of its own
token = next(p[9:] for p in os.listdir(d) if len(p) == 9 + 32)  # memshare-<token>
seg = max((p for p in os.listdir(d) if p.startswith(f"memshare-{token}-")),
          key=lambda p: os.stat(os.path.join(d, p)).st_size)
path = os.path.join(d, seg)
reader = "import sys, memshare as ms\\n" \\
    "try:\\n" \\
    "    print(float(ms.loads(bytes.fromhex(sys.argv[1])).sum()))\\n" \\
    "except PermissionError as e:\\n" \\
    "    print('PermissionError', e)\\n"
def read():
    msg = ms.dumps(a).hex()  # by handle (plain pickle would copy the array)
    out = subprocess.run([sys.executable, "-c", reader, msg], capture_output=True, text=True,
                         timeout=120)
    if out.stdout.startswith("PermissionError"):
        ms.loads(bytes.fromhex(msg))  # adopt the pin the reader could not
    return out.stdout.strip() or out.stderr
results = {"plain": read()}
# An attacker's file in its place, through a symbolic link...
fake = path + ".attacker"
with open(fake, "wb") as f:
    f.write(b"\\0" * os.stat(path).st_size)
os.chmod(fake, 0o600)
os.rename(path, path + ".orig")
os.symlink(fake, path)
results["symlink"] = read()
os.unlink(path)
os.unlink(fake)
# ...a file of another user...
os.rename(path + ".orig", path)
os.chown(path, 65534, 65534)
results["other user"] = read()
os.chown(path, 0, 0)
# ...or one that others may write.
os.chmod(path, 0o666)
results["mode 666"] = read()
os.chmod(path, 0o600)
results["restored"] = read()
results["parent still reads"] = float(a.sum())
print(json.dumps(results))
"""


def test_swapped_segments_are_refused_with_permission_error(shared_dir):
    needs_root()
    res = last_json(run_python(SWAP_VICTIM, {"MEMSHARE_DIR": str(shared_dir)}))
    total = float(sum(range(1 << 20)))
    assert res["plain"] == str(total) and res["restored"] == str(total), res
    assert res["symlink"].startswith("PermissionError") and "symbolic link" in res["symlink"]
    assert (
        res["other user"].startswith("PermissionError")
        and "belongs to user 65534" in (res["other user"])
    )
    assert res["mode 666"].startswith("PermissionError") and "666" in res["mode 666"], res
    assert res["parent still reads"] == total
    assert not list(shared_dir.iterdir())


# --- memory goes back to the OS by itself (item 10) ---------------------------------

DECAY = """
import json, time, numpy as np, memshare as ms
held = [ms.share(np.ones(75 << 17)) for _ in range(8)]  # 8 x 75 MiB = 600 MiB
peak = ms.stats()["bytes_reserved"]
del held
dropped = time.monotonic()
# Nothing but reading the figures from here on: the decay thread does the work.
deadline = dropped + 90
while ms.stats()["bytes_reserved"] > LIMIT and time.monotonic() < deadline:
    time.sleep(0.2)
after = ms.stats()
# Punched pages are reserved again before reuse and hold what is written.
b = ms.share(np.arange(75 << 17, dtype=np.float64))
print(json.dumps({"peak": peak, "after": after["bytes_reserved"], "retain": after["retain"],
                  "in_use": after["bytes_in_use"], "ok": float(b[-1]) == (75 << 17) - 1,
                  "again": ms.stats()["bytes_reserved"]}))
"""


@pytest.mark.parametrize(
    ("retain", "limit"), [(None, 128 << 20), ("0", 4 << 20), ("64M", (64 + 4) << 20)]
)
def test_idle_free_memory_goes_back_to_the_os_with_no_calls(retain, limit):
    env = {} if retain is None else {"MEMSHARE_RETAIN": retain}
    res = last_json(run_python(DECAY.replace("LIMIT", str(limit)), env, timeout=180))
    assert res["peak"] >= 600 << 20, res
    assert res["after"] <= limit, res
    assert res["in_use"] == 0 and res["ok"], res
    assert res["again"] >= 75 << 20, res
    assert res["retain"] == {None: 16 << 20, "0": 0, "64M": 64 << 20}[retain]


def test_bad_retain_is_a_value_error():
    out = run_python(LIMIT_PROBE, {"MEMSHARE_RETAIN": "some"})
    assert out.stdout.startswith("ValueError") and "MEMSHARE_RETAIN" in out.stdout, out


REUSE_FULL = """
import json, os, time, numpy as np, memshare as ms
d = os.environ["MEMSHARE_DIR"]
a = ms.share(np.ones(5 << 20))  # 40 MiB in the tmpfs
del a
deadline = time.monotonic() + 90
while ms.stats()["bytes_reserved"] > 8 << 20 and time.monotonic() < deadline:
    time.sleep(0.2)
punched = ms.stats()["bytes_reserved"]
# Someone else fills the tmpfs: the punched pages cannot be had again there.
with open(os.path.join(d, "filler"), "wb") as f:
    try:
        while True:
            f.write(b"x" * (1 << 20))
            f.flush()
    except OSError:
        pass
b = ms.share(np.full(5 << 20, 2.0))  # must not SIGBUS
s = ms.stats()
os.unlink(os.path.join(d, "filler"))
print(json.dumps({"punched": punched, "sum": float(b.sum()), "memfd": s["memfd_segments"]}))
"""


def test_reuse_after_decay_on_a_full_tmpfs_is_reserved_again_not_sigbus(tmpfs):
    res = last_json(run_python(REUSE_FULL, {"MEMSHARE_DIR": str(tmpfs)}, timeout=180))
    assert res["punched"] <= 8 << 20, res
    assert res["sum"] == 2.0 * (5 << 20) and res["memfd"] >= 1, res
    assert not list(tmpfs.iterdir())


# --- reserve overhead and fragmentation (item 11) ------------------------------------


def test_a_limit_holds_nine_tenths_of_itself_in_equal_blocks():
    code = (
        "import json, numpy as np, memshare as ms\n"
        "res = {}\n"
        "for mib in (10, 1):\n"
        "    held = []\n"
        "    try:\n"
        "        while len(held) < 1000:\n"
        "            held.append(ms.empty((mib << 20) // 8))\n"
        "    except MemoryError as e:\n"
        "        res[mib] = [len(held), 'MEMSHARE_LIMIT' in str(e)]\n"
        "    del held\n"
        "print(json.dumps(res))\n"
    )
    res = last_json(run_python(code, {"MEMSHARE_LIMIT": "50M"}))
    assert res["10"] == [5, True], res  # 50 MiB of 10 MiB arrays
    assert res["1"][0] >= 45 and res["1"][1], res


def test_a_crowded_tmpfs_holds_what_its_free_space_allows(tmpfs_200):
    tmpfs = tmpfs_200
    code = (
        "import json, os, numpy as np, memshare as ms\n"
        "d = os.environ['MEMSHARE_DIR']\n"
        "with open(os.path.join(d, 'other'), 'wb') as f:\n"  # 120 MB taken by someone else
        "    f.write(b'x' * 120_000_000)\n"
        "held = []\n"
        "while ms.stats()['memfd_segments'] == 0 and len(held) < 20:\n"
        "    held.append(ms.share(np.ones((10 << 20) // 8)))\n"
        "in_tmpfs = len(held) - (ms.stats()['memfd_segments'] > 0)\n"
        "os.unlink(os.path.join(d, 'other'))\n"
        "print(json.dumps({'in_tmpfs': in_tmpfs}))\n"
    )
    res = last_json(run_python(code, {"MEMSHARE_DIR": str(tmpfs)}))
    assert res["in_tmpfs"] >= 6, res  # 80 MB free holds six 10 MiB arrays, not five
    assert not list(tmpfs.iterdir())


STEADY = """
import json, time, numpy as np, memshare as ms
rng = np.random.default_rng(7)
held = []
for step in range(3000):  # churn: arrays of 64 KiB to 4 MiB, about 300 alive
    if held and (len(held) > 300 or rng.random() < 0.45):
        held.pop(int(rng.integers(len(held))))
    held.append(ms.empty(int(rng.integers(8 << 10, 512 << 10))))
def bound():
    s = ms.stats()
    segment = min(max(s["bytes_segments"] // 8, 16 << 20), 128 << 20)
    return s, 1.15 * s["bytes_in_use"] + segment
deadline = time.monotonic() + 90
s, b = bound()
while s["bytes_reserved"] > b and time.monotonic() < deadline:
    time.sleep(0.2)
    s, b = bound()
print(json.dumps({"reserved": s["bytes_reserved"], "in_use": s["bytes_in_use"], "bound": b}))
"""


def test_steady_state_reserve_is_within_fifteen_percent_and_a_segment():
    res = last_json(run_python(STEADY, {}, timeout=180))
    assert res["in_use"] > 100 << 20, res
    assert res["reserved"] <= res["bound"], res


# --- memory-backed segments whose every holder is gone ------------------------------

GONE_MEMFD = """
import json, os, signal, sys
import numpy as np, memshare as ms

def child(how):
    b = ms.empty((20 << 20) // 8)  # the shm directory is full: a memfd
    b[:] = 1.0
    assert ms.stats()["memfd_segments"] >= 1
    if how == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
    del b  # its free block stays in the arena's free lists

if __name__ == "__main__":
    method, how = sys.argv[1], sys.argv[2]
    d = os.environ["MEMSHARE_DIR"]
    a = ms.share(np.ones(1000))
    st = os.statvfs(d)
    with open(os.path.join(d, "filler"), "wb") as f:
        f.write(b"x" * (st.f_bavail * st.f_frsize - (4 << 20)))
    p = ms.get_context(method).Process(target=child, args=(how,))
    p.start()
    p.join(60)
    # The child held the memfd alone: its memory went with the child.
    c = ms.empty((20 << 20) // 8)
    c[:] = 2.0
    ms.reap()
    s = ms.stats()
    print(json.dumps({"exit": p.exitcode, "c": float(c.sum()), "a": float(a.sum()),
                      "live": s["live_blocks"], "memfd": s["memfd_segments"]}))
    del c
    os.unlink(os.path.join(d, "filler"))
"""


@pytest.mark.parametrize("how", ["exited", "killed"])
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_memory_backed_segment_that_went_with_its_last_holder_is_dropped(
    tmpfs, tmp_path, method, how
):
    """Its free blocks leave the free lists and its blocks the counts: the
    next allocation (that would have taken its free block) and the next
    reap (that walks every segment) succeed."""
    script = tmp_path / "gone_memfd.py"
    script.write_text(GONE_MEMFD)
    env = {k: v for k, v in os.environ.items() if k not in ("MEMSHARE_ARENA", "MEMSHARE_LIMIT")}
    env["MEMSHARE_DIR"] = str(tmpfs)
    out = subprocess.run(
        [sys.executable, str(script), method, how],
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT,
    )
    res = last_json(out)
    assert res["exit"] == (0 if how == "exited" else -9), res
    assert res["c"] == 2.0 * ((20 << 20) // 8) and res["a"] == 1000.0, res
    assert res["live"] == 2 and res["memfd"] == 1, res  # a, and c in a memfd of its own
    assert not list(tmpfs.iterdir()), "nothing is left in the tmpfs after exit"


# --- a 64 MB /dev/shm (item 12) --------------------------------------------------------

FRAME = """
import json, os, sys
import numpy as np, pandas as pd
import memshare as ms

def total(df):
    return float(df["a"].sum() + df["b"].sum())

if __name__ == "__main__":
    n = (1 << 30) // 16  # a 1 GiB frame
    df = ms.share(pd.DataFrame({"a": np.arange(n, dtype=np.float64), "b": np.ones(n)}))
    expect = total(df)
    out = {"stats": ms.stats()}
    for method in ("fork", "spawn", "forkserver"):
        with ms.get_context(method).Pool(1) as pool:
            out[method] = pool.apply(total, (df,)) == expect
    print(json.dumps(out))
"""


def test_a_1_gib_frame_is_shared_under_a_64_mb_dev_shm(tmpfs, tmp_path):
    script = tmp_path / "frame_under_small_shm.py"
    script.write_text(FRAME)
    env = {k: v for k, v in os.environ.items() if k not in ("MEMSHARE_ARENA", "MEMSHARE_LIMIT")}
    env["MEMSHARE_DIR"] = str(tmpfs)
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600
    )
    res = last_json(out)
    assert res["fork"] and res["spawn"] and res["forkserver"], res
    assert res["stats"]["memfd_segments"] >= 1 and res["stats"]["bytes_in_use"] >= 1 << 30, res
    assert not list(tmpfs.iterdir()), "nothing is left in the tmpfs after exit"
