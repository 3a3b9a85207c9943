"""Crash recovery: how long from a SIGKILL to the dead process's memory being
reused, automatically (the next allocation after the once-a-second check)
and with an explicit ``ms.reap()``."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import fmt_time, table

import memshare as ms

HOLDER = """
import sys, memshare as ms
a = ms.empty(100 << 17)  # 100 MiB
a[::512] = 1.0
print(a.__array_interface__["data"][0], flush=True)
sys.stdin.read()
"""

SIZE = 100 << 20


def one(explicit: bool) -> float:
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    p.stdout.readline()
    in_use = ms.stats()["bytes_in_use"]
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    t0 = time.perf_counter()
    if explicit:
        ms.reap()
    # Reused once an allocation of the same size fits without growing the arena
    # (segments: committed bytes also fall when idle pages go back to the OS).
    segments = ms.stats()["bytes_segments"]
    while ms.stats()["bytes_in_use"] >= in_use:
        ms.empty(16)  # each allocation checks for dead processes once a second
    t = time.perf_counter() - t0
    b = ms.empty(SIZE // 8)
    assert ms.stats()["bytes_segments"] == segments, "the dead process's block was reused"
    del b
    p.stdout.close()
    p.stdin.close()
    return t


def main() -> None:
    print("## Crash recovery\n")
    keep = ms.empty(1)  # noqa: F841 - create this tree's arena first: children join it
    rows = []
    for explicit, label in ((True, "ms.reap() right after the kill"), (False, "automatic")):
        times = [one(explicit) for _ in range(5)]
        rows.append(
            [
                label,
                fmt_time(statistics.median(times)),
                f"{fmt_time(min(times))} - {fmt_time(max(times))}",
            ]
        )
    print(
        table(
            "Time from SIGKILL of a process holding 100 MiB to that memory being reusable",
            ["how", "median of 5", "range"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
