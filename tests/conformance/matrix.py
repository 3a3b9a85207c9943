"""CPython's own Pool/Queue/ProcessPoolExecutor tests, stock against memshare.

Runs ``run.py`` for every (Python, suite, start method, implementation) asked
for, each in a fresh process with its own memshare directory, and prints a
table: tests run, passing on the stock library, passing on memshare. Then it
lists every test that passes on stock but not on memshare (and the reverse).
Exit status 1 if memshare fails a test that the stock library passes, or
leaves shared memory behind.

    python tests/conformance/matrix.py --python .venv/bin/python --suite mp
    python tests/conformance/matrix.py --python .venv-3.13/bin/python \\
        --suite mp --suite cf --start fork --start spawn --start forkserver

Suites: ``mp`` is ``test._test_multiprocessing``'s Pool, PoolWorkerErrors,
PoolWorkerLifetime, Queue/JoinableQueue and TestInitializers tests; ``cf`` is
the process pool part of ``test.test_concurrent_futures`` (process pool,
wait, as_completed, shutdown, deadlock, init), which needs an interpreter
whose install has that package (3.13; 3.11's has not).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PASSING = ("pass", "xfail")
RESTARTS = 5


def run_one(
    python: str, suite: str, impl: str, start: str, only: list[str], timeout: float, log: Path
) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """Outcomes {test id: (outcome, detail)} and the segments left behind."""
    shm = Path(tempfile.mkdtemp(prefix="memshare-conformance-", dir="/dev/shm"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.jsonl"
        env = dict(os.environ, MEMSHARE_DIR=str(shm))
        env.pop("MEMSHARE_ARENA", None)
        cmd = [python, str(HERE / "run.py"), "--suite", suite, "--impl", impl]
        cmd += ["--start", start, "--out", str(out)]
        for word in only:
            cmd += ["-k", word]
        skip = Path(tmp) / "skip.txt"
        cmd += ["--skip", str(skip)]
        outcomes: dict[str, tuple[str, str]] = {}
        with open(log, "w") as err:
            # A test that crashes or hangs the run is recorded as such; the
            # run goes on after it.
            for _ in range(RESTARTS + 1):
                skip.write_text("\n".join(outcomes))
                try:
                    subprocess.run(
                        cmd, env=env, stdout=err, stderr=subprocess.STDOUT, timeout=timeout, cwd=tmp
                    )
                except subprocess.TimeoutExpired:
                    err.write(f"\nconformance: the run took more than {timeout} s\n")
                started = None
                if out.exists():
                    for line in out.read_text().splitlines():
                        d = json.loads(line)
                        outcomes[d["id"]] = (d["outcome"], d["detail"])
                        started = d["id"] if d["outcome"] == "started" else None
                if started is None:
                    break
                outcomes[started] = ("hang-or-crash", f"the run ended in this test, see {log}")
    left = sorted(p.name for p in shm.iterdir())
    shutil.rmtree(shm, ignore_errors=True)
    return outcomes, left


#: The stdlib test module each suite needs in the interpreter's install.
SUITE_MODULES = {"mp": "test._test_multiprocessing", "cf": "test.test_concurrent_futures"}


def _probe(python: str) -> tuple[str, set[str]]:
    """The interpreter's version and the suites its install has."""
    code = (
        "import importlib.util, sys; print('%d.%d' % sys.version_info[:2]); "
        f"print(*[s for s, m in {SUITE_MODULES!r}.items() if importlib.util.find_spec(m)])"
    )
    out = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    version, suites = out.stdout.splitlines()
    return version, set(suites.split())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", action="append", required=True)
    parser.add_argument("--suite", action="append", choices=["mp", "cf"])
    parser.add_argument("--start", action="append", choices=["fork", "spawn", "forkserver"])
    parser.add_argument("--impl", action="append", choices=["stock", "memshare"])
    parser.add_argument("-k", action="append", default=[], help="only tests whose id has this")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--logs", default=None, help="directory for each run's output")
    args = parser.parse_args()
    suites = args.suite or ["mp"]
    starts = args.start or ["fork", "spawn", "forkserver"]
    impls = args.impl or ["stock", "memshare"]
    logs = Path(args.logs or tempfile.mkdtemp(prefix="memshare-conformance-logs-"))
    logs.mkdir(parents=True, exist_ok=True)

    rows = []
    problems = []
    for python in map(os.path.abspath, args.python):
        version, available = _probe(python)
        for suite in suites:
            if suite not in available:
                print(f"{suite} is not in the install of {version} ({python}): not run")
                continue
            for start in starts:
                results = {}
                for impl in impls:
                    log = logs / f"{version}-{suite}-{start}-{impl}.log"
                    print(f"running {suite} on {version} ({start}, {impl})", flush=True)
                    outcomes, left = run_one(python, suite, impl, start, args.k, args.timeout, log)
                    results[impl] = outcomes
                    if left and impl == "memshare":
                        problems.append(f"{version} {suite} {start}: left in shm: {left}")
                    if not outcomes:
                        problems.append(f"{version} {suite} {start} {impl}: no results, see {log}")
                rows.append((suite, version, start, results))

    print()
    header = f"{'suite':6} {'python':6} {'start':10} {'tests':>5} {'run':>5}"
    header += "".join(f" {'pass ' + impl:>13}" for impl in impls)
    print(header)
    print("-" * len(header))
    diffs = []
    for suite, version, start, results in rows:
        ids = sorted(set().union(*(r.keys() for r in results.values())))
        ran = [i for i in ids if any(r.get(i, ("",))[0] != "skip" for r in results.values())]
        line = f"{suite:6} {version:6} {start:10} {len(ids):5} {len(ran):5}"
        for impl in impls:
            passed = sum(results[impl].get(i, ("",))[0] in PASSING for i in ids)
            line += f" {passed:13}"
        print(line)
        if "stock" in results and "memshare" in results:
            for i in ids:
                stock = results["stock"].get(i, ("missing", ""))
                ours = results["memshare"].get(i, ("missing", ""))
                if (stock[0] in PASSING) != (ours[0] in PASSING):
                    diffs.append((suite, version, start, i, stock, ours))
    if diffs:
        print("\ndifferences (stock -> memshare):")
        for _suite, version, start, i, stock, ours in diffs:
            print(f"  {version} {start:10} {i}: {stock[0]} -> {ours[0]}")
            detail = (ours[1] or stock[1]).strip().splitlines()[-3:]
            for text in detail:
                print(f"      {text}")
    for p in problems:
        print(f"problem: {p}")
    print(f"\nlogs in {logs}")
    worse = [d for d in diffs if d[4][0] in PASSING]
    return 1 if worse or problems else 0


if __name__ == "__main__":
    sys.exit(main())
