"""Before and after: the same public-API probes against two memshare installs.

    python benches/compare_versions.py --before /path/to/old/.venv/bin/python

Each probe runs in a fresh process of each interpreter, alternating
before, after, before, after, ... so that a change in the machine's load
falls on both; every figure is the median [min-max] of the runs. The probes
use only what every memshare version has (``ms.share``, ``ms.Pool``,
``ms.Queue``), and workload (a) is this tree's ``examples/outer_product.py``
run unchanged by both.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import REPEAT, ROOT, conditions, fmt_time, load, summary, table

# Each probe prints one JSON object: {"seconds": ...} or {"locks": ...}
# (lower is better) or {"tasks_per_s": ...} (higher is better).
PROBES = {
    "workload (a), ms.Pool(2), 16 tasks": (
        "tasks_per_s",
        f"""
        import sys, time
        sys.path.insert(0, {str(ROOT / "examples")!r})
        import outer_product
        t0 = time.perf_counter()
        outer_product.run("memshare", 16)
        print(json.dumps({{"tasks_per_s": 16 / (time.perf_counter() - t0)}}))
        """,
    ),
    "warm ms.share of 1 GiB": (
        "seconds",
        """
        src = np.ones(1 << 27)
        a = ms.share(src); del a  # the arena's pages are warm from here on
        t = []
        for _ in range(3):
            t0 = time.perf_counter(); a = ms.share(src); t.append(time.perf_counter() - t0); del a
        print(json.dumps({"seconds": sorted(t)[1]}))
        """,
    ),
    "a worker receives and sums a shared 1 GiB array": (
        "seconds",
        """
        import multiprocessing as mp
        def total(a):
            return float(a.sum())
        if __name__ == "__main__":
            a = ms.share(np.ones(1 << 27))
            with ms.Pool(2, context=mp.get_context("fork")) as pool:
                pool.apply(total, (a[:10],))
                t = []
                for _ in range(3):
                    t0 = time.perf_counter(); s = pool.apply(total, (a,))
                    t.append(time.perf_counter() - t0)
                    assert s == 1 << 27
            print(json.dumps({"seconds": sorted(t)[1]}))
        """,
    ),
    "10 MB private array through ms.Queue, put to get": (
        "seconds",
        """
        import multiprocessing as mp
        def consume(q, done, n):
            for _ in range(n):
                a = q.get(timeout=60); done.put(time.perf_counter()); del a
        if __name__ == "__main__":
            ctx = mp.get_context("fork")
            q, done, n = ms.Queue(4), ctx.SimpleQueue(), 25
            p = ctx.Process(target=consume, args=(q, done, n)); p.start()
            src = np.ones(10 << 17)  # 10 MiB of float64
            lat = []
            for _ in range(n):
                t0 = time.perf_counter(); q.put(src, timeout=60); lat.append(done.get() - t0)
            p.join(60)
            lat = sorted(lat[5:])
            print(json.dumps({"seconds": lat[len(lat) // 2]}))
        """,
    ),
    "one-way hand-off of a shared 1 KiB array through ms.Queue": (
        "seconds",
        """
        import multiprocessing as mp, statistics
        def consume(q, back, n):
            lat = []
            for _ in range(n):
                a = q.get(timeout=60); lat.append(time.perf_counter() - a[0]); del a
                back.put(None)
            back.put(lat)
        if __name__ == "__main__":
            ctx = mp.get_context("fork")
            q, back, n = ms.Queue(2), ms.Queue(2), 300
            p = ctx.Process(target=consume, args=(q, back, n)); p.start()
            a = ms.zeros(128)
            for _ in range(n):
                a[0] = time.perf_counter(); q.put(a, timeout=60); back.get(timeout=60)
            lat = back.get(timeout=60)[1:]
            p.join(60)
            print(json.dumps({"seconds": statistics.median(lat)}))
        """,
    ),
    "round trip of an int through two ms.Queue": (
        "seconds",
        """
        import multiprocessing as mp
        def echo(qin, qout, n):
            for _ in range(n):
                qout.put(qin.get(timeout=60) + 1)
        if __name__ == "__main__":
            ctx = mp.get_context("fork")
            qin, qout, n = ms.Queue(), ms.Queue(), 5000
            p = ctx.Process(target=echo, args=(qin, qout, n)); p.start()
            qin.put(0); qout.get(timeout=60)
            t0 = time.perf_counter()
            for i in range(n - 1):
                qin.put(i); qout.get(timeout=60)
            dt = (time.perf_counter() - t0) / (n - 1)
            p.join(60)
            print(json.dumps({"seconds": dt}))
        """,
    ),
    "100,000 identity tasks, chunksize 100, ms.Pool(2).map": (
        "seconds",
        """
        def identity(x):
            return x
        if __name__ == "__main__":
            data = list(range(100_000))
            with ms.Pool(2) as pool:
                pool.map(identity, data, chunksize=100)
                t = []
                for _ in range(5):
                    t0 = time.perf_counter(); pool.map(identity, data, chunksize=100)
                    t.append(time.perf_counter() - t0)
            print(json.dumps({"seconds": sorted(t)[2]}))
        """,
    ),
    "camera/matcher without sleeps: arena-lock acquisitions per frame sent": (
        "locks",
        f"""
        import sys
        sys.path.insert(0, {str(ROOT / "examples")!r})
        import producer_consumer
        if __name__ == "__main__":
            r = producer_consumer.run(fps=None)
            print(json.dumps({{"locks": r["lock_acquisitions"] / r["sent"]}}))
        """,
    ),
}

PRELUDE = "import json, time, numpy as np, memshare as ms\n"


def run_probe(python: str, code: str) -> dict:
    out = subprocess.run(
        [python, "-c", PRELUDE + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{python}: probe failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt(kind: str, m: tuple[float, float, float]) -> str:
    if kind == "tasks_per_s":
        return f"{m[0]:.2f} [{m[1]:.2f}-{m[2]:.2f}] tasks/s"
    if kind == "locks":
        return f"{m[0]:.1f} [{m[1]:.1f}-{m[2]:.1f}]"
    return f"{fmt_time(m[0])} [{fmt_time(m[1])}-{fmt_time(m[2])}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="python of the earlier install")
    ap.add_argument("--after", default=sys.executable, help="python of the later install")
    ap.add_argument("--repeat", type=int, default=REPEAT)
    ap.add_argument("--only", default="", help="run the probes whose title contains this")
    args = ap.parse_args()
    versions = {}
    for name, py in (("before", args.before), ("after", args.after)):
        probe = "import memshare; print(memshare.__file__)"
        versions[name] = subprocess.run(
            [py, "-c", probe], capture_output=True, text=True, check=True, timeout=120
        ).stdout.strip()
    print(conditions())
    print(f"before: {versions['before']}\nafter:  {versions['after']}\n")
    rows = []
    for title, (kind, code) in PROBES.items():
        if args.only not in title:
            continue
        runs: dict[str, list[float]] = {"before": [], "after": []}
        for _ in range(args.repeat):
            for name, py in (("before", args.before), ("after", args.after)):
                runs[name].append(run_probe(py, code)[kind])
        b, a = summary(runs["before"]), summary(runs["after"])
        ratio = a[0] / b[0] if kind == "tasks_per_s" else b[0] / a[0]  # fewer locks: better
        rows.append([title, fmt(kind, b), fmt(kind, a), f"{ratio:.2f}x"])
        print(rows[-1], flush=True)
    print(
        table(
            f"Before and after (median [min-max] of {args.repeat} alternating runs; "
            f"load {load():.2f} when done)",
            ["", "before", "after", "after is better by"],
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
