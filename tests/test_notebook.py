"""A real Jupyter kernel (ipykernel, driven by nbclient) runs the seed's
workloads as a notebook user writes them, under fork, spawn and forkserver.

Everything the cells define lives in the kernel's ``__main__``, which has no
file: spawn and forkserver children cannot import it, so memshare sends those
functions, lambdas, classes and targets by value. The kernel gets a shared
memory directory of its own, which must be empty once it has shut down.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from traitlets.config import Config

T = 180  # seconds: the bound of the kernel's start, of every cell and of its shutdown
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "producer_consumer.py"


def example_source() -> str:
    """The producer/consumer example as a user pastes it into a cell: every
    definition, without the command line part."""
    source = EXAMPLE.read_text()
    return source[: source.index("\ndef main(")]


# (cell source, what the cell prints); METHOD is replaced by the start method.
CELLS = [
    (
        """
import gc
import multiprocessing as mp
import numpy as np
import memshare as ms

ctx = ms.get_context("METHOD")
print(ctx.get_start_method())
""",
        "METHOD\n",
    ),
    (  # a function of the notebook, with the standard library's context
        """
def square(x):
    return x * x

with ms.Pool(2, context=mp.get_context("METHOD")) as pool:
    print(pool.map(square, range(8)))
""",
        "[0, 1, 4, 9, 16, 25, 36, 49]\n",
    ),
    (  # lambdas
        """
with ctx.Pool(2) as pool:
    print(pool.map(lambda x: x + 1, range(5)))
    print(sorted(pool.imap_unordered(lambda x: -x, range(3))))
""",
        "[1, 2, 3, 4, 5]\n[-2, -1, 0]\n",
    ),
    (  # a method of an instance of a notebook class; large arrays by handle
        """
class Scaler:
    def __init__(self, k):
        self.k = k

    def scale(self, a):
        return a * self.k

frame = np.ones((512, 512))  # 2 MiB: shared once, not copied
with ctx.Pool(2) as pool:
    out = pool.map(Scaler(3).scale, [frame, 2 * frame])
print([float(a.sum()) for a in out], all(ms.is_shared(a) for a in out))
del out, frame
""",
        "[786432.0, 1572864.0] True\n",
    ),
    (  # an initializer that sets a global; results of a notebook class
        """
from dataclasses import dataclass

@dataclass
class Match:
    camera: int
    score: float

OFFSET = 0

def init(offset):
    global OFFSET
    OFFSET = offset

def match(cam):
    return Match(cam + OFFSET, 0.5)

with ctx.ProcessPoolExecutor(2, initializer=init, initargs=(100,)) as ex:
    found = list(ex.map(match, range(3)))
print([m.camera for m in found], all(isinstance(m, Match) for m in found), OFFSET)
""",
        "[100, 101, 102] True 0\n",
    ),
    (  # a Process target and a queue
        """
def total(q, n):
    q.put(sum(range(n)))

q = ctx.Queue()
p = ctx.Process(target=total, args=(q, 10))
p.start()
print(q.get(timeout=60))
p.join(60)
print(p.exitcode)
""",
        "45\n0\n",
    ),
    # the seed's producer/consumer program pasted into a cell, then run:
    # cameras and matchers are Process targets of the notebook
    (example_source(), ""),
    (
        """
r = run(n_frames=3, fps=None, ctx=ms.get_context("METHOD"))
print(r["sent"] + r["skipped"], r["sent"] > 0, r["matched"] == r["sent"])
""",
        "15 True True\n",
    ),
    (  # all shared memory is back
        """
del q, p, r, found
gc.collect()
s = ms.stats()
print(s["live_blocks"], s["pins"], s["bytes_in_use"])
""",
        "0 0 0\n",
    ),
]


def stdout_of(cell: nbformat.NotebookNode) -> str:
    return "".join(
        o["text"] for o in cell.outputs if o["output_type"] == "stream" and o["name"] == "stdout"
    )


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_notebook_workloads(method, tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(src.strip().replace("METHOD", method)) for src, _ in CELLS
    ]
    shm = Path(os.environ["MEMSHARE_DIR"]) / f"kernel-{method}"  # in the session's
    shm.mkdir()
    env = dict(os.environ)
    env.pop("MEMSHARE_ARENA", None)  # a process tree of its own ...
    env["MEMSHARE_DIR"] = str(shm)  # ... in a directory of its own
    env["IPYTHONDIR"] = str(tmp_path / "ipython")
    config = Config()
    config.KernelManager.shutdown_wait_time = T  # a graceful exit, never a kill after 5 s
    config.KernelManager.connection_file = str(tmp_path / "kernel.json")
    client = NotebookClient(
        nb,
        config=config,
        kernel_name="python3",
        timeout=T,
        startup_timeout=T,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    try:
        # Then shuts the kernel down and waits (up to T) for it to exit.
        client.execute(env=env)
        outputs = [stdout_of(cell) for cell in nb.cells]
        assert outputs == [expected.replace("METHOD", method) for _, expected in CELLS]
        assert sorted(p.name for p in shm.iterdir()) == []  # the kernel's tree left nothing
    finally:
        for p in shm.iterdir():
            p.unlink()
        shm.rmdir()
