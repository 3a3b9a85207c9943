"""The memshare command line: ls and gc on live and dead arenas."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np

import memshare as ms
from memshare import _native

TIMEOUT = 60

HOLDER = """
import os, sys, numpy as np, memshare as ms
a = ms.share(np.ones(1_000_000))
print(ms._native.arena_token(), flush=True)
sys.stdin.read()  # hold the memory until killed
"""


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "memshare", *args], capture_output=True, text=True, timeout=TIMEOUT
    )


def start_holder() -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if k != "MEMSHARE_ARENA"}  # its own arena
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    token = p.stdout.readline().strip()
    assert len(token) == 32, token
    return p, token


def test_ls_shows_live_arena_with_owner():
    a = ms.share(np.ones(10))
    out = run_cli("ls", "--json")
    assert out.returncode == 0, out.stderr
    arenas = {x["token"]: x for x in json.loads(out.stdout)}
    mine = arenas[_native.arena_token()]
    assert mine["alive"] and (os.getpid(), True) in [tuple(o) for o in mine["owners"]]
    assert mine["live_blocks"] >= 1
    assert "alive" in run_cli("ls").stdout
    del a


def test_gc_removes_arena_of_killed_process_only():
    p, token = start_holder()
    shm_dir = _native.shm_dir()
    try:
        assert any(f.startswith(f"memshare-{token}") for f in os.listdir(shm_dir))
        assert token not in run_cli("gc").stdout, "a live arena is never collected"
        p.send_signal(signal.SIGKILL)
        p.wait(TIMEOUT)
        listing = {x["token"]: x for x in json.loads(run_cli("ls", "--json").stdout)}
        assert listing[token]["alive"] is False
        assert listing[token]["bytes_in_use"] > 0
        dry = run_cli("gc", "--dry-run")
        assert dry.returncode == 0 and token in dry.stdout
        assert any(f.startswith(f"memshare-{token}") for f in os.listdir(shm_dir))
        real = run_cli("gc", "--json")
        assert token in json.loads(real.stdout)["removed"]
        assert not any(f.startswith(f"memshare-{token}") for f in os.listdir(shm_dir))
        assert _native.arena_token() in {
            x["token"] for x in json.loads(run_cli("ls", "--json").stdout)
        }
    finally:
        p.kill()
        p.communicate(timeout=TIMEOUT)  # closes the pipes


def test_cli_usage_errors_exit_2():
    assert run_cli("frobnicate").returncode == 2
    assert run_cli().returncode == 2


def test_dir_before_or_after_the_command(tmp_path):
    a = ms.share(np.ones(10))
    shm_dir = _native.shm_dir()
    for args in (["--dir", shm_dir, "ls", "--json"], ["ls", "--json", "--dir", shm_dir]):
        out = run_cli(*args)
        assert out.returncode == 0, out.stderr
        assert _native.arena_token() in {x["token"] for x in json.loads(out.stdout)}, args
    for args in (["--dir", str(tmp_path), "ls"], ["ls", "--dir", str(tmp_path)]):
        out = run_cli(*args)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == f"no memshare arenas in {tmp_path}", args
    for args in (
        ["--dir", str(tmp_path), "gc", "--json"],
        ["gc", "--json", "--dir", str(tmp_path)],
    ):
        out = run_cli(*args)
        assert json.loads(out.stdout) == {"removed": [], "dry_run": False}, args
    del a


def test_version_flag():
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"memshare {ms.__version__}"
