"""Storage of the arena: limits, segment names and ownership, memory given
back to the OS, fragmentation, and memory-backed segments when the shm
directory is too small."""

from __future__ import annotations

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


@pytest.fixture
def tmpfs(request):
    """A real tmpfs of the size given by the test's ``tmpfs_size`` mark (MiB)."""
    needs_root()
    mark = request.node.get_closest_marker("tmpfs_size")
    size = mark.args[0] if mark else 64
    path = Path(tempfile.mkdtemp(prefix="memshare-storage-tmpfs-"))
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}m", "tmpfs", str(path)])
    if res.returncode != 0:
        path.rmdir()
        pytest.skip("this machine cannot mount a tmpfs")
    yield path
    subprocess.run(["umount", str(path)], check=True)
    path.rmdir()


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
import json, os, pickle, subprocess, sys, numpy as np, memshare as ms
d = os.environ["MEMSHARE_DIR"]
a = ms.share(np.arange(1 << 20, dtype=np.float64))  # 8 MiB: a segment of its own
token = next(p[9:] for p in os.listdir(d) if len(p) == 9 + 32)  # memshare-<token>
seg = max((p for p in os.listdir(d) if p.startswith(f"memshare-{token}-")),
          key=lambda p: os.stat(os.path.join(d, p)).st_size)
path = os.path.join(d, seg)
reader = "import pickle, sys, memshare as ms\\n" \\
    "try:\\n" \\
    "    print(float(pickle.loads(bytes.fromhex(sys.argv[1])).sum()))\\n" \\
    "except PermissionError as e:\\n" \\
    "    print('PermissionError', e)\\n"
def read():
    msg = pickle.dumps(a).hex()
    out = subprocess.run([sys.executable, "-c", reader, msg], capture_output=True, text=True,
                         timeout=120)
    pickle.loads(bytes.fromhex(msg))  # adopt the pin if the reader did not
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
