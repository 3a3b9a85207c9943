"""memshare.Process and memshare.get_context; callables defined in ``__main__``.

Programs run with ``python -c`` have a ``__main__`` without a file, as a
notebook or a REPL has: spawn and forkserver children cannot re-import it,
so what it defines must travel by value (``_callables``).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

import memshare as ms
from memshare import _callables, _process

START_METHODS = ["fork", "spawn", "forkserver"]
T = 120  # seconds: the bound of every blocking call


def run_main(code: str, *args: str) -> dict:
    """Runs ``code`` as ``python -c`` (its own process tree) and returns the
    JSON object it prints last."""
    env = dict(os.environ)
    env.pop("MEMSHARE_ARENA", None)  # a tree of its own, in the session's directory
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=T,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


PROCESS_PROGRAM = """
    import json, sys
    import numpy as np
    import memshare as ms

    ctx = ms.get_context(sys.argv[1])
    out = {}
    LIMIT = 0  # a global the child sets (below) and its own functions read

    def produce(q, n):
        q.put(("produce", n, ms.full(n, 2.0)))  # born in shared memory

    class Doubler:
        def __init__(self, k):
            self.k = k

        def put(self, q, x):
            q.put(("method", self.k * x, None))

    class Worker(ctx.Process):
        def run(self):
            self._args[0].put(("subclass", self.name, None))

    def set_limit(n):
        global LIMIT
        LIMIT = n

    def limited(q):
        set_limit(7)
        q.put(("globals", read_limit(), None))

    def read_limit():
        return LIMIT

    q = ms.Queue()
    procs = [
        ctx.Process(target=produce, args=(q, 1000)),
        ctx.Process(target=lambda q, x: q.put(("lambda", x + 1, None)), args=(q, 41)),
        ctx.Process(target=Doubler(3).put, args=(q, 5)),
        Worker(args=(q,), name="w1"),
        ctx.Process(target=limited, args=(q,)),
    ]
    for p in procs:
        p.start()
    for _ in procs:
        kind, value, arr = q.get(timeout=60)
        out[kind] = value if arr is None else [value, float(arr.sum()), ms.is_shared(arr)]
    del arr
    for p in procs:
        p.join(60)
    out["exitcodes"] = [p.exitcode for p in procs]
    out["parent_limit"] = LIMIT
    print(json.dumps(out))
"""


@pytest.mark.parametrize("method", START_METHODS)
def test_process_targets_defined_in_main(method):
    """Functions, lambdas, bound methods of instances and Process subclasses
    defined in a file-less ``__main__`` run under every start method; a
    child's functions of ``__main__`` share one namespace."""
    out = run_main(PROCESS_PROGRAM, method)
    assert out == {
        "produce": [1000, 2000.0, True],
        "lambda": 42,
        "method": 15,
        "subclass": "w1",
        "globals": 7,
        "exitcodes": [0, 0, 0, 0, 0],
        "parent_limit": 0,
    }


def test_stdlib_process_fails_on_such_targets():
    """What the test above guards against: the standard library's Process
    cannot run a target of a file-less ``__main__`` under spawn."""
    code = """
        import json, multiprocessing as mp
        def target():
            pass
        p = mp.get_context("spawn").Process(target=target)
        p.start()
        p.join(60)
        print(json.dumps({"exitcode": p.exitcode}))
    """
    assert run_main(code) == {"exitcode": 1}


def put_sum(q, values):
    q.put(sum(values))


@pytest.mark.parametrize("method", START_METHODS)
def test_process_importable_target(method):
    """Importable targets go by reference, as in the standard library."""
    q = ms.Queue()
    p = ms.get_context(method).Process(target=put_sum, args=(q, [1, 2, 3]))
    p.start()
    assert q.get(timeout=T) == 6
    p.join(T)
    assert p.exitcode == 0


def test_default_process_uses_default_start_method():
    q = ms.Queue()
    p = ms.Process(target=put_sum, args=(q, range(4)))
    assert isinstance(p, mp.Process)
    p.start()
    assert q.get(timeout=T) == 6
    p.join(T)
    assert p.exitcode == 0


@pytest.mark.parametrize("method", START_METHODS)
def test_get_context_members(method):
    ctx = ms.get_context(method)
    assert ctx.get_start_method() == method
    assert ctx.get_context() is ctx
    assert ctx.get_context("spawn") is ms.get_context("spawn")
    assert isinstance(ctx, mp.context.BaseContext)
    assert issubclass(ctx.Process, mp.get_context(method).Process)
    assert isinstance(ctx.Queue(4), ms.Queue)
    assert isinstance(ctx.JoinableQueue(), ms.JoinableQueue)
    lock = ctx.Lock()  # the standard library's
    with lock:
        pass
    with ctx.Pool(1) as pool:
        assert isinstance(pool, ms.Pool)
        assert pool.apply(sum, ([1, 2],)) == 3
    with ctx.ProcessPoolExecutor(1) as ex:
        assert isinstance(ex, ms.ProcessPoolExecutor)
        assert ex.submit(sum, [3, 4]).result(timeout=T) == 7


def test_get_context_default_and_errors():
    assert ms.get_context().get_start_method() == mp.get_start_method()
    with pytest.raises(ValueError, match="cannot find context"):
        ms.get_context("thread")
    assert _process.as_memshare_context(mp.get_context("spawn")) is ms.get_context("spawn")
    assert _process.as_memshare_context(None) is ms.get_context()
    other = object()
    assert _process.as_memshare_context(other) is other


# --- the pickling decision ----------------------------------------------------------


def test_importable_callables_go_by_reference():
    for obj in (put_sum, len, ms.Queue, ms.share, os.path.join):
        assert _callables.by_reference(obj, False), obj
        assert _callables.portable(obj, False) is obj
    data = _callables.dumps(put_sum, main_by_ref=False)
    assert b"put_sum" in data and len(data) < 100  # a name, not code
    assert pickle.loads(data) is put_sum


def test_lambdas_and_local_functions_go_by_value():
    k = 5

    def local(x):
        return x + k

    for fn in (lambda x: x * k, local):
        assert not _callables.by_reference(fn, True)
        again = pickle.loads(_callables.dumps(fn))
        assert again is not fn and again(2) == fn(2)
        wrapped = _callables.portable(fn, True)
        assert wrapped is not fn
        assert pickle.loads(pickle.dumps(wrapped))(3) == fn(3)


def test_main_objects_follow_the_start_method():
    """Names of ``__main__`` go by reference only where children can look
    them up: fork, or a ``__main__`` that spawn re-imports."""
    code = """
        import json
        from memshare import _callables
        def f():
            pass
        print(json.dumps({
            "fork": _callables.main_by_reference("fork"),
            "spawn": _callables.main_by_reference("spawn"),
            "by_ref_fork": _callables.by_reference(f, _callables.main_by_reference("fork")),
            "by_ref_spawn": _callables.by_reference(f, _callables.main_by_reference("spawn")),
        }))
    """
    assert run_main(code) == {
        "fork": True,
        "spawn": False,
        "by_ref_fork": True,
        "by_ref_spawn": False,
    }


POOL_PROGRAM = """
    import json, sys
    from dataclasses import dataclass
    import multiprocessing as mp
    import numpy as np
    import memshare as ms

    method = sys.argv[1]
    ctx = ms.get_context(method)
    out = {}
    SCALE = None  # set by the initializer in each worker

    def init(k):
        global SCALE
        SCALE = k

    def scaled(x):
        return x * SCALE

    @dataclass
    class Point:
        x: int
        y: int

    class Scaler:
        def __init__(self, k):
            self.k = k

        def scale(self, a):
            return a * self.k

    def to_point(i):
        return Point(i, -i)

    big = np.arange(1 << 18, dtype=np.float64)  # 2 MiB: shared once, not copied
    with ms.Pool(2, context=mp.get_context(method), initializer=init, initargs=(3,)) as pool:
        out["pool_map"] = pool.map(scaled, range(5))
        out["pool_lambda"] = pool.map(lambda x: x + 1, range(5))
        out["pool_imap"] = list(pool.imap(lambda x: -x, range(3)))
        res = pool.map(Scaler(2).scale, [big, big + 1])
        out["pool_method"] = [float(r.sum()) for r in res] + [ms.is_shared(res[0])]
        points = pool.map(to_point, range(3))
        out["pool_class"] = [isinstance(p, Point) for p in points] + [points[2].y]
        out["pool_apply"] = pool.apply(lambda p: p.x + p.y + 1, (Point(2, 3),))
        del res
    with ctx.ProcessPoolExecutor(2, initializer=init, initargs=(10,)) as ex:
        out["ex_map"] = list(ex.map(scaled, range(3)))
        out["ex_lambda"] = ex.submit(lambda: "done").result(timeout=60)
        p = ex.submit(to_point, 4).result(timeout=60)
        out["ex_class"] = [isinstance(p, Point), p.y]
    print(json.dumps(out))
"""


@pytest.mark.parametrize("method", START_METHODS)
def test_pools_run_callables_defined_in_main(method):
    """Pool and ProcessPoolExecutor: functions, lambdas, methods, classes
    and initializers of a file-less ``__main__`` under every start method;
    instances of its classes come back as instances of the same class."""
    out = run_main(POOL_PROGRAM, method)
    total = float(np.arange(1 << 18, dtype=np.float64).sum())
    assert out == {
        "pool_map": [0, 3, 6, 9, 12],
        "pool_lambda": [1, 2, 3, 4, 5],
        "pool_imap": [0, -1, -2],
        "pool_method": [2 * total, 2 * (total + (1 << 18)), True],
        "pool_class": [True, True, True, -2],
        "pool_apply": 6,
        "ex_map": [0, 10, 20],
        "ex_lambda": "done",
        "ex_class": [True, -4],
    }


class _Registered:
    pass


def _rebuild_registered() -> str:
    return "rebuilt by the registered reducer"


def test_pickler_applies_every_reducer_table():
    """ForkingPickler's reducers (also ones registered later) win over
    cloudpickle's, which apply to what the standard library cannot pickle."""
    from multiprocessing.reduction import ForkingPickler

    ForkingPickler.register(_Registered, lambda obj: (_rebuild_registered, ()))
    try:
        assert pickle.loads(_callables.dumps(_Registered())) == _rebuild_registered()
    finally:
        del ForkingPickler._extra_reducers[_Registered]
    proxy = types.MappingProxyType({"a": 1})  # cloudpickle's reducer
    assert pickle.loads(_callables.dumps(proxy)) == proxy
    with pytest.raises(TypeError):
        pickle.dumps(proxy)
