"""`make demo`: the naive parallel code, three ways, and where the memory went.

Runs workload (a) (row outer product: 40 MB frame in, 200 MB array out per
task) and workload (b) (20x20 convolution of the whole frame per task) as a
plain loop, with ``multiprocessing.Pool`` and with ``memshare.Pool`` — the
same code, only the import differs (see outer_product.py and convolution.py)
— and prints tasks/s: the median of 5 runs (interleaved, so a change of
load hits every mode alike) with its min-max, ratios of those medians, and
the load average; it warns when the load is above the number of cores. Every
figure it prints was measured in that run. Then, in one more run of each,
it samples the proportional set size (PSS, from /proc/<pid>/smaps_rollup)
of this process and its workers: shared pages count once, split among the
processes that map them.
Takes about two minutes on 2 cores.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import convolution
import outer_product

MODES = ["sequential", "multiprocessing", "memshare"]
LABELS = {
    "sequential": "sequential loop",
    "multiprocessing": "multiprocessing.Pool",
    "memshare": "memshare.Pool",
}

NAIVE = """\
  def do_work(args):
      frame, row_label = args                      # a 40 MB DataFrame and a label
      random = np.random.rand(*frame.shape)
      return np.outer(frame.loc[row_label], random.mean(axis=0))   # 200 MB

  from multiprocessing import Pool
  with Pool(2) as pool:
      for result in pool.imap(do_work, ((frame, label) for label in labels)):
          total += result.sum()
"""

CHANGE = """\
- from multiprocessing import Pool
+ from memshare import Pool
"""


# --- PSS of this process tree ------------------------------------------------------


def _pss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # the process has just exited
        pass
    return 0.0


def _tree(root: int) -> list[int]:
    """``root`` and its descendants (from the parent pids in /proc/*/stat)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += [p for p, pp in parent.items() if pp == pid]
    return pids


class PeakPss:
    """Samples the total PSS of this process and its children in a thread."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(_pss_mb(p) for p in _tree(me)))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakPss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


RUNS = 5  # every figure: the median of this many runs, with its min-max


def timed_runs(run, tasks: int) -> dict[str, list[float]]:
    """tasks/s of RUNS runs of every mode, interleaved (loop, Pool, memshare,
    loop, ...) so a change in the machine's load hits every mode alike."""
    speeds: dict[str, list[float]] = {mode: [] for mode in MODES}
    for i in range(RUNS):
        print(f"  run {i + 1}/{RUNS}:", end="", flush=True)
        for mode in MODES:
            t0 = time.perf_counter()
            run(mode, tasks)
            speeds[mode].append(tasks / (time.perf_counter() - t0))
            print(
                f" {LABELS[mode]} {speeds[mode][-1]:.2f}",
                end=";" if mode != MODES[-1] else "",
                flush=True,
            )
        print(f"  (load {os.getloadavg()[0]:.1f})")
    return speeds


def loaded_warning(load: float, where: str = "below") -> str | None:
    cores = os.cpu_count() or 1
    if load <= cores:
        return None
    return (
        f"WARNING: the load average ({load:.1f}) is above the number of cores ({cores}):"
        f"\nother programs compete with these runs, the figures {where} are slower and"
        "\nmore spread than on a quiet machine (compare the min-max ranges)."
    )


def peak_pss(run, mode: str, tasks: int) -> float:
    """Peak total PSS (MB) of one run, measured apart from the timed runs:
    reading smaps_rollup takes the memory-map lock of the process it reads."""
    with PeakPss() as pss:
        run(mode, tasks)
    return pss.peak


def main() -> None:
    workloads = [
        ("(a) row outer product", outer_product.run, 8),
        ("(b) 20x20 convolution", convolution.run, 3),
    ]
    cores = os.cpu_count() or 1
    load_at_start = os.getloadavg()[0]
    print(f"memshare demo on {cores} cores, 2 worker processes, load average {load_at_start:.2f}\n")
    warning = loaded_warning(load_at_start)
    if warning:
        print(warning + "\n")
    print("The naive code (examples/outer_product.py), workload (a):\n")
    print(NAIVE)
    print("With multiprocessing it is slower than a plain loop: the frame is pickled")
    print("into every task and every 200 MB result is pickled back. The change:\n")
    print(CHANGE)
    outer_product.run("memshare", 2)  # warm the shared memory up once
    loads = [load_at_start]
    for title, run, tasks in workloads:
        print(f"{title}, {tasks} tasks per run, {RUNS} runs:")
        speeds = timed_runs(run, tasks)
        loads.append(os.getloadavg()[0])
        med = {mode: statistics.median(v) for mode, v in speeds.items()}
        print(f"\n{title}: tasks/s, median of {RUNS} runs [min-max]")
        print(f"  {'':22} {'tasks/s':>20} {'vs loop':>8} {'vs Pool':>8}")
        for mode in MODES:
            v = speeds[mode]
            cell = f"{med[mode]:.2f} [{min(v):.2f}-{max(v):.2f}]"
            print(
                f"  {LABELS[mode]:22} {cell:>20} {med[mode] / med['sequential']:7.2f}x "
                f"{med[mode] / med['multiprocessing']:7.2f}x"
            )
        print()
    print(f"Load average during the runs: {min(loads):.2f} to {max(loads):.2f} on {cores} cores.")
    warning = loaded_warning(max(loads), "above")
    if warning:
        print(warning)
    print()
    tasks = 6
    print(f"Where the memory went: (a) once more, {tasks} tasks, sampling the total PSS of")
    print("the parent and its workers (shared pages count once, split among the")
    print("processes that map them; from /proc/<pid>/smaps_rollup)\n")
    print(f"  {'':22} {'peak PSS':>10}")
    for mode in MODES:
        print(f"  {LABELS[mode]:22} {peak_pss(outer_product.run, mode, tasks):7,.0f} MB")
    print(
        "\nmultiprocessing.Pool holds pickled copies of the frame and of every result"
        "\nin flight, in the parent and in each worker; memshare.Pool maps the frame"
        "\nonce and workers write their results straight into shared memory, which"
        "\nthe parent reads in place and recycles. `make bench` compares more tools."
    )


if __name__ == "__main__":
    main()
