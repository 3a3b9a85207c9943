"""Queue benchmarks: memshare.Queue against multiprocessing.Queue (and Pipe).

1. One 10 MB float64 array from a producer to a consumer process: median
   one-way latency (the consumer reads the producer's clock stamp, both use
   CLOCK_MONOTONIC).
2. The same latency from 1 KB to 100 MB.
3. Small messages (an int): round-trip latency and one-way messages/s,
   memshare.Queue vs multiprocessing.Queue vs multiprocessing.Pipe.
4. The camera/matcher scenario (examples/producer_consumer.py) without its
   artificial sleeps: frames/s end to end on both queues.

Prints Markdown tables; medians of several runs; no assertions.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import REPEAT, conditions, fmt_time, summary, table

import memshare as ms
from memshare._queue import Queue

ROOT = Path(__file__).resolve().parent.parent
CTX = mp.get_context("forkserver")


def _load_example():
    # On sys.path (not loaded from a file) so spawn/forkserver children find it.
    sys.path.insert(0, str(ROOT / "examples"))
    import producer_consumer

    return producer_consumer


# --- one-way latency of arrays ----------------------------------------------------


def _latency_consumer(q, back, n):
    for _ in range(n):
        t0, a = q.get(timeout=600)
        t1 = time.perf_counter()
        a[0]  # touch it: the data must be usable
        back.put(t1 - t0)
        del a


def one_way(make_queue, nbytes: int, reps: int, born_shared: bool) -> float:
    q, back = make_queue(2), make_queue(2)
    p = CTX.Process(target=_latency_consumer, args=(q, back, reps))
    p.start()
    n = max(nbytes // 8, 1)
    lats = []
    for _ in range(reps):
        a = ms.empty(n) if born_shared else np.empty(n)
        a[:] = 1.0
        q.put((time.perf_counter(), a), timeout=600)
        del a
        lats.append(back.get(timeout=600))
    p.join(60)
    return statistics.median(lats[1:] if len(lats) > 2 else lats)


def bench_latency() -> str:
    out = []
    ms10 = one_way(Queue, 10 << 20, 15, True)
    ms10_plain = one_way(Queue, 10 << 20, 15, False)
    mp10 = one_way(CTX.Queue, 10 << 20, 15, False)
    out.append(
        table(
            "One 10 MB float64 array, producer -> consumer (median one-way latency)",
            ["transport", "latency", "vs multiprocessing.Queue"],
            [
                ["multiprocessing.Queue (pickle + pipe)", fmt_time(mp10), "1.0x"],
                [
                    "ms.Queue, array born shared (ms.empty)",
                    fmt_time(ms10),
                    f"{mp10 / ms10:.0f}x faster",
                ],
                [
                    "ms.Queue, plain ndarray (shared on put: one copy)",
                    fmt_time(ms10_plain),
                    f"{mp10 / ms10_plain:.1f}x faster",
                ],
            ],
        )
    )
    rows = []
    for size, reps in [
        (1 << 10, 30),
        (100 << 10, 30),
        (1 << 20, 20),
        (10 << 20, 10),
        (100 << 20, 5),
    ]:
        a = one_way(Queue, size, reps, True)
        b = one_way(CTX.Queue, size, reps, False)
        label = f"{size >> 20} MB" if size >= 1 << 20 else f"{size >> 10} KB"
        rows.append([label, fmt_time(a), fmt_time(b), f"{b / a:.1f}x"])
        gc.collect()
    out.append(
        table(
            "One-way latency by array size (median)",
            ["size", "ms.Queue (born shared)", "multiprocessing.Queue", "ratio"],
            rows,
        )
    )
    return "\n".join(out)


# --- one-way hand-off of an array already in shared memory -----------------------


def _handoff_consumer(q, back, n):
    lats = []
    for _ in range(n):
        a = q.get(timeout=600)
        lats.append(time.perf_counter() - a[0])  # read a[0] right after get
        del a
        back.put(None)
    back.put(lats)


def handoff(nbytes: int, reps: int) -> list[float]:
    """One-way latencies: the producer writes its clock into a[0] and puts a
    (already in shared memory); the consumer reads a[0] right after get.
    Both use perf_counter (CLOCK_MONOTONIC, one clock for every process)."""
    q, back = Queue(2), Queue(2)
    p = CTX.Process(target=_handoff_consumer, args=(q, back, reps))
    p.start()
    a = ms.zeros(max(nbytes // 8, 1))
    for _ in range(reps):
        a[0] = time.perf_counter()
        q.put(a, timeout=600)
        back.get(timeout=600)
    lats = back.get(timeout=600)
    p.join(60)
    return lats[1:]  # the first maps the segment in the consumer


def bench_handoff() -> str:
    rows = []
    meds = []
    for size, reps in [(1 << 10, 300), (1 << 20, 300), (100 << 20, 100), (1 << 30, 40)]:
        # REPEAT separate producer/consumer pairs; each gives the median of its messages
        runs = [statistics.median(handoff(size, reps)) for _ in range(REPEAT)]
        m = summary(runs)
        meds.append(m[0])
        label = (
            f"{size >> 30} GiB"
            if size >= 1 << 30
            else (f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB")
        )
        rows.append([label, reps, f"{fmt_time(m[0])} [{fmt_time(m[1])}-{fmt_time(m[2])}]"])
        gc.collect()
    spread_x = max(meds) / min(meds)
    return table(
        "One-way hand-off of an array already in shared memory through ms.Queue (the "
        "producer writes its clock into a[0] and puts a; the consumer reads a[0] right "
        f"after get). Median of {REPEAT} runs [min-max]; goal <= 25 µs, within 2x across "
        f"sizes (here {spread_x:.2f}x)",
        ["size", "messages per run", "one-way latency"],
        rows,
    )


# --- small messages -------------------------------------------------------------


def _echo_queue(qin, qout, n):
    for _ in range(n):
        qout.put(qin.get(timeout=600) + 1)


def _echo_pipe(conn, n):
    for _ in range(n):
        conn.send(conn.recv() + 1)


def _drain_queue(q, n, done):
    for _ in range(n):
        q.get(timeout=600)
    done.put(time.perf_counter())


def _drain_pipe(conn, n):
    for _ in range(n):
        conn.recv()
    conn.send(time.perf_counter())


def round_trip(kind: str, n: int) -> float:
    if kind == "pipe":
        a, b = CTX.Pipe()
        p = CTX.Process(target=_echo_pipe, args=(b, n))
        p.start()
        a.send(0)
        a.recv()  # warm
        t0 = time.perf_counter()
        for i in range(n - 1):
            a.send(i)
            a.recv()
    else:
        make = Queue if kind == "ms" else CTX.Queue
        qin, qout = make(), make()
        p = CTX.Process(target=_echo_queue, args=(qin, qout, n))
        p.start()
        qin.put(0)
        qout.get(timeout=600)
        t0 = time.perf_counter()
        for i in range(n - 1):
            qin.put(i)
            qout.get(timeout=600)
    dt = time.perf_counter() - t0
    p.join(60)
    return dt / (n - 1)


def throughput(kind: str, n: int) -> float:
    if kind == "pipe":
        a, b = CTX.Pipe()
        p = CTX.Process(target=_drain_pipe, args=(b, n))
        p.start()
        t0 = time.perf_counter()
        for i in range(n):
            a.send(i)
        t1 = a.recv()
    else:
        make = Queue if kind == "ms" else CTX.Queue
        q, done = make(1000), make()
        p = CTX.Process(target=_drain_queue, args=(q, n, done))
        p.start()
        t0 = time.perf_counter()
        for i in range(n):
            q.put(i)
        t1 = done.get(timeout=600)
    p.join(60)
    return n / (t1 - t0)


def rust_peer() -> Path | None:
    """examples/queue_peer.rs, built by cargo if it is here; None if absent."""
    exe = ROOT / "target" / "release" / "examples" / "queue_peer"
    if shutil.which("cargo") is not None:
        build = ["cargo", "build", "--quiet", "--release", "-p", "memshare", "--example"]
        subprocess.run([*build, "queue_peer"], cwd=ROOT, check=True, timeout=900)
    return exe if exe.exists() else None


def rust_round_trip(exe: Path, n: int) -> float:
    """Seconds per round trip of an 8-byte message through two ms.Queue
    rings with Rust on both ends (queue_peer ping and echo): the transport
    without Python, this machine's floor for it."""
    a, b = Queue(), Queue()
    handles = f"{a._q.handle().hex()},{b._q.handle().hex()}"
    echo = subprocess.Popen([exe, "echo", handles, str(n)])
    ping = subprocess.run(
        [exe, "ping", handles, str(n)], capture_output=True, text=True, check=True, timeout=600
    )
    echo.wait(60)
    return float(ping.stdout.split()[2]) * 1e-6


def bench_small() -> str:
    names = {"ms": "ms.Queue", "mp": "multiprocessing.Queue", "pipe": "multiprocessing.Pipe"}
    rts: dict[str, list[float]] = {k: [] for k in names}
    tps: dict[str, list[float]] = {k: [] for k in names}
    floor: list[float] = []
    peer = rust_peer()  # built once, before the clock
    for _ in range(REPEAT):  # interleaved: ms, mp, pipe, Rust, ms, ...
        for k in names:
            rts[k].append(round_trip(k, 5000))
        if peer is not None:
            floor.append(rust_round_trip(peer, 5000))
        for k in names:
            tps[k].append(throughput(k, 100_000))
    rt = {k: statistics.median(v) for k, v in rts.items()}
    tp = {k: statistics.median(v) for k, v in tps.items()}
    rows = [
        [
            names[k],
            f"{fmt_time(rt[k])} [{fmt_time(min(rts[k]))}-{fmt_time(max(rts[k]))}]",
            f"{rt['mp'] / rt[k]:.1f}x",
            f"{rt[k] / rt['pipe']:.2f}",
            f"{tp[k]:,.0f}",
            f"{tp[k] / tp['mp']:.1f}x",
        ]
        for k in names
    ]
    if floor:
        f = statistics.median(floor)
        rows.append(
            [
                "ms.Queue from Rust on both ends (queue_peer ping/echo: the floor)",
                f"{fmt_time(f)} [{fmt_time(min(floor))}-{fmt_time(max(floor))}]",
                f"{rt['mp'] / f:.1f}x",
                f"{f / rt['pipe']:.2f}",
                "",
                "",
            ]
        )
    return table(
        f"Small messages (an int): round trip and one-way throughput (medians of {REPEAT} "
        "interleaved runs; goal: ms.Queue round trip <= 25 µs and <= 0.5 of mp.Pipe's)",
        [
            "transport",
            "round trip",
            "speed vs mp.Queue",
            "round trip / mp.Pipe's",
            "messages/s",
            "vs mp.Queue",
        ],
        rows,
    )


# --- camera / matcher -----------------------------------------------------------------


def bench_cameras() -> str:
    pc = _load_example()
    rows = []
    res = {}
    for name, factory, plain in [
        ("ms.Queue (frames born in shared memory)", Queue, False),
        ("multiprocessing.Queue (frames pickled)", CTX.Queue, True),
    ]:
        runs = [pc.run(20, None, 8, factory, plain, CTX) for _ in range(REPEAT)]
        fps = statistics.median(r["frames_per_s"] for r in runs)
        skipped = statistics.median(r["skipped"] for r in runs)
        res[name] = fps
        frames = statistics.median(r["sent"] for r in runs)
        locks = statistics.median(r["lock_acquisitions"] / max(r["sent"], 1) for r in runs)
        rows.append(
            [name, f"{fps:.1f}", f"{skipped:.0f} of 100", f"{locks:.1f} ({frames:.0f} sent)"]
        )
        gc.collect()
    base = res["multiprocessing.Queue (frames pickled)"]
    for r in rows:
        r.append(f"{res[r[0]] / base:.2f}x")
    return table(
        "Camera/matcher scenario, no sleeps: 5 cameras x 20 frames of 5000x250 float64, "
        f"2 matchers, maxsize 8 (medians of {REPEAT} runs)",
        [
            "queue",
            "frames matched/s",
            "frames skipped",
            "arena-lock acquisitions per frame sent (cameras + matchers)",
            "vs multiprocessing.Queue",
        ],
        rows,
    )


def main() -> None:
    parts = sys.argv[1:] or ["handoff", "latency", "small", "cameras"]
    print("## Queue\n", flush=True)
    print(f"_{conditions()}_\n", flush=True)
    benches = {
        "handoff": bench_handoff,
        "latency": bench_latency,
        "small": bench_small,
        "cameras": bench_cameras,
    }
    for name in parts:
        print(benches[name](), flush=True)


if __name__ == "__main__":
    main()
