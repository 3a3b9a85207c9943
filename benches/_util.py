"""Helpers shared by the benchmark scripts and the demo: timing, the state of
the machine while they ran, and Markdown tables.

Every figure a benchmark prints is the median of at least ``REPEAT`` runs with
its min-max, and every table says the load average it was measured under: on
a loaded machine the spread shows it, and the ratios are still comparable
because they come from runs interleaved in the same process run.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# At least 5 runs per figure (BENCH_REPEAT raises it, never below 5).
REPEAT = max(5, int(os.environ.get("BENCH_REPEAT", "5")))


def measure(
    fn: Callable[[], object], repeat: int = REPEAT, warmup: int = 1
) -> tuple[float, float, float]:
    """(median, min, max) wall seconds of ``fn()`` over ``repeat`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def measure_interleaved(
    fns: dict[str, Callable[[], object]], repeat: int = REPEAT, warmup: int = 1
) -> dict[str, tuple[float, float, float]]:
    """Like :func:`measure` for several alternatives, run A, B, C, A, B, C, ...

    Interleaving spreads a change in the machine's load over every
    alternative, so their ratios stay fair on a busy machine.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {n: (statistics.median(t), min(t), max(t)) for n, t in times.items()}


def summary(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of measured values."""
    return statistics.median(values), min(values), max(values)


def load() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def commit() -> str:
    """The short commit id of the checkout (with ``+`` if it has local changes)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+" if dirty else "")


def conditions() -> str:
    """One line saying when, where and under which load figures were taken."""
    cores = os.cpu_count() or 1
    la = load()
    busy = " (LOADED: above the core count)" if la > cores else ""
    return (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit()}, "
        f"{cores} cores, load average {la:.2f}{busy}"
    )


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def spread(m: tuple[float, float, float]) -> str:
    return f"{fmt_time(m[0])} [{fmt_time(m[1])}-{fmt_time(m[2])}]"


def table(title: str, header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table, with the load average at the time it was printed."""
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    lines += ["", f"_load average {load():.2f} on {os.cpu_count()} cores when done_"]
    return "\n".join(lines) + "\n"


def thp_setting(name: str) -> str:
    """The selected value of a transparent_hugepage setting, e.g. ``never``."""
    try:
        with open(f"/sys/kernel/mm/transparent_hugepage/{name}") as f:
            text = f.read()
    except OSError:
        return "unknown"
    return text[text.find("[") + 1 : text.find("]")] if "[" in text else text.strip()
