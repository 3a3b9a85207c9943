"""What the README and docs/ claim, checked: every ```python block runs, and
the handle sizes they give hold.

Each block runs in a fresh ``python -c`` process (a file-less ``__main__``,
as in a notebook), with its own segment directory that must be empty once the
process is gone. A block may use names it does not define (``frame``,
``labels``, ``q``: the code around it in a real program): FIXTURES defines
them, and only those the block uses. A block whose free names have no
fixture fails, so a new block is checked as soon as it is written. Top-level
``await`` runs in an event loop. A block that cannot run here (needs a
cluster, say) opts out with ``<!-- not run: the reason -->`` on the line
before its fence; it is then not collected (the suite has no skips).
"""

from __future__ import annotations

import ast
import builtins
import os
import re
import subprocess
import symtable
import sys
import tempfile
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np
import pytest

import memshare as ms

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TIMEOUT = 300  # seconds per block, for a loaded machine

#: Names the docs' fragments take from the surrounding program. Each entry
#: is self-contained; a block gets only those it uses and does not define.
FIXTURES = {
    "np": "import numpy as np",
    "pd": "import pandas as pd",
    "asyncio": "import asyncio",
    "multiprocessing": "import multiprocessing",
    "frame": "import numpy as _np, pandas as _pd\n"
    "frame = _pd.DataFrame(_np.random.rand(4, 500), index=list('abcd'))",
    "labels": "labels = list('abcd')",
    "df": "import numpy as _np, pandas as _pd\n"
    "df = _pd.DataFrame({'price': _np.random.rand(100_000), 'qty': _np.arange(100_000)})",
    "received": "import pandas as _pd, memshare as _ms\n"
    "from multiprocessing.reduction import ForkingPickler as _FP\n"
    "received = _FP.loads(_FP.dumps(_ms.share(_pd.DataFrame("
    "{'price': [2.0, 3.0], 'qty': [1, 2]}))))",
    "total": "total = 0.0",
    "camera": "camera = 3",
    "camera_id": "camera_id = 3",
    "descriptors": "import numpy as _np\ndescriptors = _np.ones((100, 32))",
    "do_work": "def do_work(args):\n    frame, label = args\n    return frame.loc[label].sum()",
    "work": "def work(args):\n    frame, i = args\n    return frame.iloc[i % len(frame)].sum()",
    "worker": "def worker(q):\n    pass",
    "queue": "import memshare as _ms\nqueue = _ms.Queue()  # a queue object, not the module",
    "q": "import memshare as _ms\nq = _ms.Queue()\nq.put('first')\nq.put('second')",
    "loop": "import asyncio as _asyncio\nloop = _asyncio.get_running_loop()",
    "client": "from distributed import Client as _Client, LocalCluster as _LocalCluster\n"
    "import memshare.dask as _msdask\n"
    "_cluster = _LocalCluster(n_workers=2, processes=True, dashboard_address=None)\n"
    "client = _Client(_cluster)\n_msdask.register(client)",
}
#: What runs after a block that used the fixture.
TEARDOWN = {"client": "client.close()\n_cluster.close()"}
#: Files a block reads, made in its working directory when it names them.
FILES = {
    "big.parquet": "import numpy as _np, pandas as _pd\n"
    "_pd.DataFrame({'price': _np.random.rand(10_000), 'qty': _np.arange(10_000)})"
    ".to_parquet('big.parquet')",
}
#: Runs the source from stdin in the real __main__ (fork children and
#: by-reference pickling look names up there), top-level await allowed.
RUNNER = """
import ast as _ast, asyncio as _asyncio, sys as _sys
_code = compile(_sys.stdin.read(), "<docs block>", "exec", flags=_ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
_result = eval(_code, _sys.modules["__main__"].__dict__)
if _asyncio.iscoroutine(_result):
    _asyncio.run(_result)
"""
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
OPT_OUT = re.compile(r"<!--\s*not run:\s*(\S.*?)\s*-->\s*$")


def blocks_of(text: str, name: str) -> list[tuple[str, str, str | None]]:
    """The ```python blocks of a Markdown text: (name:line, source, opt-out reason)."""
    blocks = []
    for m in FENCE.finditer(text):
        if m.group(1) not in ("python", "py"):
            continue
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        opt_out = OPT_OUT.search(before)
        blocks.append((f"{name}:{line}", m.group(2), opt_out and opt_out.group(1)))
    return blocks


def python_blocks() -> list:
    """The blocks to run (an opted-out block is not collected: no skips)."""
    found = [b for doc in DOCS for b in blocks_of(doc.read_text(), str(doc.relative_to(ROOT)))]
    return [pytest.param(source, id=name) for name, source, reason in found if reason is None]


def _stored(node: ast.AST) -> set[str]:
    names = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load):
            names.add(n.id)
        elif isinstance(n, ast.arg):
            names.add(n.arg)
    return names


def _read(node: ast.AST | None) -> set[str]:
    """Names an expression reads from outside itself (its comprehension
    variables and lambda arguments are its own)."""
    if node is None:
        return set()
    loads = {
        n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
    }
    own = set()
    for n in ast.walk(node):
        if isinstance(n, ast.comprehension):
            own |= _stored(n.target)
        elif isinstance(n, ast.Lambda):
            own |= _stored(n.args)
    return loads - own


def _scan(stmts: list[ast.stmt], bound: set[str], free: set[str]) -> None:
    """Module-level statements in order: what each reads before it is bound."""

    def need(*exprs):
        for e in exprs:
            free.update(_read(e) - bound)

    for st in stmts:
        if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            need(*st.decorator_list, *getattr(st, "bases", []))
            bound.add(st.name)  # bodies run later: see free_names
        elif isinstance(st, (ast.For, ast.AsyncFor)):
            need(st.iter)
            bound.update(_stored(st.target))
            _scan(st.body + st.orelse, bound, free)
        elif isinstance(st, (ast.With, ast.AsyncWith)):
            for item in st.items:
                need(item.context_expr)
                if item.optional_vars is not None:
                    bound.update(_stored(item.optional_vars))
            _scan(st.body, bound, free)
        elif isinstance(st, (ast.If, ast.While)):
            need(st.test)
            _scan(st.body + st.orelse, bound, free)
        elif isinstance(st, ast.Try):
            _scan(st.body, bound, free)
            for h in st.handlers:
                need(h.type)
                bound.update({h.name} if h.name else set())
                _scan(h.body, bound, free)
            _scan(st.orelse + st.finalbody, bound, free)
        elif isinstance(st, ast.AugAssign):
            need(
                st.value,
                ast.Name(st.target.id, ast.Load())
                if isinstance(st.target, ast.Name)
                else st.target,
            )
            bound.update(_stored(st.target))
        elif isinstance(st, (ast.Assign, ast.AnnAssign)):
            need(st.value)
            for t in getattr(st, "targets", [getattr(st, "target", None)]):
                need(*[n for n in ast.walk(t) if isinstance(n, (ast.Attribute, ast.Subscript))])
                bound.update(_stored(t))
        elif isinstance(st, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in st.names)
        else:
            need(st)
            bound.update(_stored(st))


def free_names(source: str) -> set[str]:
    """Names the block reads before it binds them: at module level in order,
    and the globals its functions read that nothing binds."""
    bound, free = set(), set()
    _scan(ast.parse(source).body, bound, free)
    globals_read, globals_set = set(), set()

    def visit(table: symtable.SymbolTable) -> None:
        for child in table.get_children():
            for sym in child.get_symbols():
                if sym.is_global() and sym.is_referenced():
                    globals_read.add(sym.get_name())
                if sym.is_declared_global() and sym.is_assigned():
                    globals_set.add(sym.get_name())
            visit(child)

    visit(symtable.symtable(source, "<docs block>", "exec"))
    return (free | (globals_read - bound - globals_set)) - set(dir(builtins))


def test_extractor_finds_blocks_and_opt_outs():
    text = "x\n```python\na = 1\n```\n<!-- not run: needs a cluster -->\n```py\nb\n```\n"
    text += "```console\nmake\n```\n"
    assert blocks_of(text, "t.md") == [
        ("t.md:2", "a = 1\n", None),
        ("t.md:6", "b\n", "needs a cluster"),
    ]


def test_free_names_follow_scopes_and_order():
    source = (
        "import numpy as np\nx = y + np.pi\ntotal += 1\nfor i in z:\n    w = i\n"
        "def f(a):\n    global K\n    K = a\n    return g(a, K)\n"
        "c, d = e, [v for v in e]\nq = (lambda t: t + h)(1)\nm = m_first\nm_first = 1\n"
    )
    assert free_names(source) == {"y", "total", "z", "g", "e", "h", "m_first"}


def test_the_docs_have_python_blocks():
    ids = [p.id for p in python_blocks()]
    assert any(i.startswith("README.md") for i in ids), ids
    assert len(ids) >= 10, ids


@pytest.mark.parametrize("block", python_blocks())
def test_python_block_runs(block, tmp_path):
    missing = free_names(block) - FIXTURES.keys()
    assert not missing, f"the block uses {sorted(missing)}: define them or add FIXTURES"
    needed = [code for name, code in FIXTURES.items() if name in free_names(block)]
    needed += [code for name, code in FILES.items() if name in block]
    after = [code for name, code in TEARDOWN.items() if name in free_names(block)]
    source = "\n".join([*needed, block, *after])
    with tempfile.TemporaryDirectory(prefix="docs-block-", dir="/dev/shm") as shm_dir:
        env = {k: v for k, v in os.environ.items() if k != "MEMSHARE_ARENA"}
        env["MEMSHARE_DIR"] = shm_dir
        out = subprocess.run(
            [sys.executable, "-c", RUNNER],
            input=source,
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=TIMEOUT,
        )
        assert out.returncode == 0, f"{source}\n--- stderr:\n{out.stderr}"
        assert not os.listdir(shm_dir), "the block left shared memory behind"


#: The docs say "under 256 bytes" wherever they give a handle's size.
HANDLE_BOUND = 256


@pytest.mark.parametrize(
    "make",
    [
        lambda: ms.share(np.arange(1_000_000, dtype="f8")),
        lambda: ms.share(np.zeros((1000, 1000))),
        lambda: ms.share(np.zeros((1000, 1000)))[::3, 7:],
        lambda: ms.share(np.asfortranarray(np.ones((300, 400, 5), "c16"))),
        lambda: ms.share(np.zeros(100_000, dtype=[("t", "M8[ns]"), ("x", "f4", (3,))])),
        lambda: ms.share(np.zeros(100_000, "U16")),
    ],
    ids=["1d", "2d", "strided", "f-order-3d", "structured", "unicode"],
)
def test_a_shared_array_travels_as_a_handle_under_256_bytes(make):
    a = make()
    message = bytes(ForkingPickler.dumps(a))  # pins the block until loaded
    assert len(message) < HANDLE_BOUND, len(message)
    b = ForkingPickler.loads(message)
    assert np.shares_memory(a, b) and b.shape == a.shape and b.strides == a.strides
    del a, b


def test_a_queue_pickles_to_a_handle_under_256_bytes():
    q = ms.Queue(maxsize=50)
    message = bytes(ForkingPickler.dumps(q))
    assert len(message) < HANDLE_BOUND, len(message)
    q.put(1)
    assert ForkingPickler.loads(message).get(timeout=60) == 1
