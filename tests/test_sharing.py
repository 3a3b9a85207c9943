"""The sharing rule (memshare._sharing): transports carry handles, every other
pickling keeps the data, ms.dumps/ms.loads carry handles with a stated
lifetime, exceptions pickle, and bad messages give HandleError only."""

from __future__ import annotations

import gc
import io
import multiprocessing as mp
import os
import pickle
import select
import subprocess
import sys
import textwrap
from multiprocessing.reduction import ForkingPickler

import joblib
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import memshare as ms
from memshare import _native, _sharing

TIMEOUT = 120
EXCEPTIONS = (ms.HandleError, ms.StaleHandleError, ms.CorruptSegmentError, ms.SharedMemoryError)


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MEMSHARE_")}


def run_python(*args: str, env: dict[str, str], cwd=None) -> subprocess.CompletedProcess:
    """Runs ``python *args`` to completion (bounded), capturing its output."""
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=TIMEOUT
    )


# --- exceptions ----------------------------------------------------------------


@pytest.mark.parametrize("cls", EXCEPTIONS, ids=lambda c: c.__name__)
def test_every_exception_round_trips_through_pickle(cls):
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        back = pickle.loads(pickle.dumps(cls("memshare: it broke"), protocol=protocol))
        assert type(back) is cls and str(back) == "memshare: it broke"
    assert cls.__module__ == "memshare" and getattr(ms, cls.__name__) is cls
    assert getattr(_native, cls.__name__) is cls, "the bindings raise the same class"


def raise_shared_memory_error(_):
    ms.empty(1 << 50)  # 8 PiB: beyond any limit or file system


@pytest.mark.parametrize("how", ["pool_map", "executor_submit"])
def test_a_workers_shared_memory_error_reaches_the_caller_as_that_type(how):
    if how == "pool_map":
        with ms.Pool(1) as pool, pytest.raises(ms.SharedMemoryError, match="cannot allocate"):
            pool.map(raise_shared_memory_error, [0], chunksize=1)
    else:
        with ms.ProcessPoolExecutor(1) as ex:
            fut = ex.submit(raise_shared_memory_error, 0)
            with pytest.raises(ms.SharedMemoryError, match="cannot allocate"):
                fut.result(TIMEOUT)


# --- every other pickling keeps the data ---------------------------------------


def shared_objects() -> dict:
    arr = ms.share(np.arange(300_000, dtype="f8"))
    return {
        "array": arr,
        "view": arr[10:-10:7],
        "frame": ms.share(pd.DataFrame({"x": np.arange(200_000), "s": ["a", "b"] * 100_000})),
        "arrow": ms.share(pa.table({"y": np.arange(200_000.0)})),
        "polars": ms.share(pl.DataFrame({"z": np.arange(200_000)})),
    }


def test_plain_pickling_joblib_hash_and_dump_leave_nothing_behind(tmp_path):
    gc.collect()
    before = ms.stats()
    objs = shared_objects()
    for protocol in (2, 4, 5):
        data = pickle.dumps(objs, protocol=protocol)
        assert len(data) > 300_000 * 8, "the bytes carry the data"
    buffers: list[pickle.PickleBuffer] = []
    pickle.dumps(objs["array"], protocol=5, buffer_callback=buffers.append)
    assert np.shares_memory(np.frombuffer(buffers[0], "f8"), objs["array"]), "zero-copy"
    del buffers
    joblib.hash(objs)
    joblib.dump(objs, tmp_path / "objs.joblib")
    loaded = joblib.load(tmp_path / "objs.joblib")
    assert np.array_equal(loaded["view"], objs["view"]) and not ms.is_shared(loaded["array"])
    assert ms.stats()["pins"] == 0, "plain pickling pins nothing"
    del objs, loaded
    gc.collect()
    after = ms.stats()
    assert after["pins"] == 0 and after["live_blocks"] == before["live_blocks"]


SAVER = """
import pickle, sys
import numpy as np, pandas as pd, pyarrow as pa, polars as pl
import memshare as ms

def work(i):
    return np.full(300_000, float(i))  # large: comes back by handle as a SharedArray

if __name__ == "__main__":
    with ms.Pool(2) as pool:
        results = pool.map(work, range(4))
    assert all(isinstance(r, ms.SharedArray) for r in results)
    base = ms.share(np.arange(1000.0))
    objs = {
        "results": results,
        "view": base[::-3],
        "frame": ms.share(pd.DataFrame({"x": np.arange(1000), "s": ["u", "v"] * 500})),
        "arrow": ms.share(pa.table({"y": np.arange(1000.0)})),
        "polars": ms.share(pl.DataFrame({"z": np.arange(1000)})),
    }
    with open(sys.argv[1], "wb") as f:
        pickle.dump(objs, f)
"""

LOADER = """
import os, pickle, sys
import numpy as np
assert not any(k.startswith("MEMSHARE_") for k in os.environ)
with open(sys.argv[1], "rb") as f:
    objs = pickle.load(f)
assert [float(r[0]) for r in objs["results"]] == [0.0, 1.0, 2.0, 3.0]
assert all(type(r) is np.ndarray and r.shape == (300_000,) for r in objs["results"])
assert np.array_equal(objs["view"], np.arange(1000.0)[::-3])
assert objs["frame"]["x"].sum() == 499500 and list(objs["frame"]["s"][:2]) == ["u", "v"]
assert objs["arrow"].column("y").to_pylist()[-1] == 999.0
assert objs["polars"]["z"].sum() == 499500
print("ok")
"""


def test_saved_results_load_in_a_later_unrelated_program(tmp_path):
    saver, loader, data = tmp_path / "saver.py", tmp_path / "loader.py", tmp_path / "objs.pkl"
    saver.write_text(SAVER)
    loader.write_text(LOADER)
    env = clean_env()
    out = run_python(str(saver), str(data), env=env)
    assert out.returncode == 0, out.stderr
    out = run_python(str(loader), str(data), env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# --- transports carry handles ----------------------------------------------------


def child_report(conn):
    a = conn.recv()
    b = conn.recv()
    a[0] = 42.0  # visible to the parent: the same memory
    conn.send((type(a).__name__, a.shape, b["a"].sum()))
    conn.recv()


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_forking_pickler_sends_a_1gib_array_as_under_256_bytes_of_the_same_memory(method):
    big = ms.empty(1 << 27)  # 1 GiB of float64, the rest left as it is
    big[:3] = 0.0  # what the child reads (a recycled block holds old bytes)
    data = bytes(ForkingPickler.dumps(big))
    assert len(data) < 256, len(data)
    ForkingPickler.loads(data)  # adopt the pin
    ctx = mp.get_context(method)
    parent, child = ctx.Pipe()
    p = ctx.Process(target=child_report, args=(child,))
    p.start()
    try:
        parent.send(big)
        parent.send({"a": big[1:3]})
        assert parent.poll(TIMEOUT)
        assert parent.recv() == ("SharedArray", (1 << 27,), 0.0)
        assert big[0] == 42.0, "the receiver wrote the same memory"
        parent.send("done")
    finally:
        p.join(TIMEOUT)
        if p.is_alive():
            p.kill()
            p.join(TIMEOUT)
    assert p.exitcode == 0


def test_forking_pickler_sends_a_1gib_mixed_frame_as_under_1_percent():
    n = 40 << 20  # 40 Mi rows: 320 + 320 + 160 + 40 MiB, pages untouched
    cols = {
        "f8": ms.empty(n, "f8"),
        "i8": ms.empty(n, "i8"),
        "f4": ms.empty(n, "f4"),
        "b": ms.empty(n, "?"),
    }
    df = pd.DataFrame(cols, copy=False)
    assert all(ms.is_shared(df[c].to_numpy()) for c in cols)
    nbytes = int(df.memory_usage(index=False).sum())
    assert nbytes >= 800 << 20
    data = bytes(ForkingPickler.dumps(df))
    assert len(data) < nbytes / 100, len(data)
    back = ForkingPickler.loads(data)
    assert back.shape == df.shape and np.shares_memory(back["f8"].to_numpy(), cols["f8"])
    assert ms.stats()["pins"] == 0


# --- ms.dumps / ms.loads ------------------------------------------------------------


def test_dumps_lifetime_is_the_senders():
    code = textwrap.dedent(
        """
        import sys, numpy as np, memshare as ms
        sys.stdout.write(ms.dumps(ms.share(np.arange(10.0))).hex())
        """
    )
    env = clean_env()
    env["MEMSHARE_DIR"] = os.environ.get("MEMSHARE_DIR", "/dev/shm")
    out = run_python("-c", code, env=env)
    assert out.returncode == 0, out.stderr
    with pytest.raises(ms.StaleHandleError, match="freed"):
        ms.loads(bytes.fromhex(out.stdout))


def test_dumps_message_never_loaded_is_released_when_its_sender_exits():
    # The sender joins this process's arena (which stays alive), makes a
    # message and exits normally without anyone loading it.
    ms.share(np.zeros(1))  # this process's arena exists and is exported
    code = textwrap.dedent(
        """
        import sys, numpy as np, memshare as ms
        sys.stdout.write(ms.dumps(ms.share(np.arange(1000.0))).hex())
        """
    )
    env = dict(os.environ)
    assert env.get("MEMSHARE_ARENA")
    out = run_python("-c", code, env=env)
    assert out.returncode == 0, out.stderr
    gc.collect()
    assert ms.stats()["pins"] == 0  # nothing is held for the message
    with pytest.raises(ms.StaleHandleError, match="freed"):
        ms.loads(bytes.fromhex(out.stdout))


def test_dumps_of_data_from_another_process_tree_pins_it_in_that_arena():
    """Data received from another process tree lies in that tree's arena,
    where this process's dumps lease cannot own pins: dumps pins it by this
    process there instead, and the message loads."""
    env = {k: v for k, v in os.environ.items() if k != "MEMSHARE_ARENA"}
    code = (
        "import memshare as ms, numpy as np, sys; a = ms.share(np.arange(10.0)); "
        "print(ms.dumps(a).hex(), flush=True); sys.stdin.readline()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        ready, _, _ = select.select([child.stdout], [], [], TIMEOUT)
        assert ready, "the other tree sent no message"
        theirs = ms.loads(bytes.fromhex(child.stdout.readline()))
        before = ms.stats()["pins"]
        back = ms.loads(ms.dumps({"x": theirs}))
        assert np.shares_memory(back["x"], theirs) and back["x"].tolist() == list(range(10))
        assert ms.stats()["pins"] == before  # nothing pinned in our own arena
        del back, theirs
        gc.collect()
    finally:
        child.communicate("done\n", timeout=TIMEOUT)
    assert child.returncode == 0


def test_dumps_loads_in_one_process_and_twice():
    a = ms.share(np.arange(100.0))
    msg = ms.dumps({"a": a, "again": a, "n": 1})
    back = ms.loads(msg)
    assert back["a"] is back["again"] and np.shares_memory(back["a"], a)
    assert ms.stats()["pins"] == 0
    again = ms.loads(msg)  # the data is still held (by `a`): loads again
    assert np.shares_memory(again["a"], a)


def test_plain_values_travel_as_an_ordinary_pickle_with_no_table():
    for value in (5, None, "x", (1, 2.5, b"z"), [True, None]):
        msg = ms.dumps(value)
        entries, payload = _native.decode_message(msg)
        assert entries == [] and pickle.loads(payload) == value
        assert ms.loads(msg) == value
    # A table-less message whose payload names a table entry is refused as such.
    forged = _native.encode_message([], pickle.dumps(0, 5).replace(b"K\x00", b"P0\n", 1))
    with pytest.raises(ms.HandleError, match="no table entry"):
        ms.loads(forged)


class _TaggedInt(int):
    """An int that can carry an array in its attributes."""


def test_only_exact_atomic_values_and_their_tuples_and_lists_are_plain():
    is_plain = _sharing.is_plain
    assert is_plain(7) and is_plain((1, "x", None, 2.5, b"", 1j, True)) and is_plain([])
    assert is_plain(((1, 2), [3]), 2) and not is_plain(((1, 2), [3]))
    assert not is_plain((((1,),),), 2)
    tagged = _TaggedInt(3)
    tagged.data = ms.share(np.arange(1000.0))
    for value in (tagged, [tagged], (1, np.zeros(3)), {"a": 1}, object()):
        assert not is_plain(value, 2)
    # Not plain, so the array it carries goes by handle.
    back = ms.loads(ms.dumps([tagged]))
    assert back == [3] and np.shares_memory(back[0].data, tagged.data)
    del back, tagged
    gc.collect()


def test_dumps_of_plain_values_makes_no_arena(tmp_path):
    env = dict(clean_env(), MEMSHARE_DIR=str(tmp_path))
    code = "import memshare as ms, os; m = ms.dumps((1, 'x')); print(ms.loads(m), os.listdir('.'))"
    out = run_python("-c", code, env=env, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "(1, 'x') []", out


# --- bad input: HandleError only --------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_messages_give_handle_error_only(data):
    a = ms.share(np.zeros((4, 5), dtype=[("x", "<i4"), ("y", "<f8", (2,))]))
    msg = bytearray(ms.dumps({"a": a, "b": a[1:, ::2]}))
    entries, payload = _native.decode_message(bytes(msg))  # release the pins
    del entries
    table_end = len(msg) - len(payload)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, table_end - 1))
        msg[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.none() | st.integers(0, len(msg)))
    if cut is not None:
        msg = msg[:cut]
    try:
        back = ms.loads(bytes(msg))
    except ms.HandleError:
        return
    # An unchanged table (a byte rewritten with its own value) loads correctly.
    assert np.array_equal(back["a"], a)


@settings(max_examples=300, deadline=None)
@given(
    st.text(max_size=80) | st.binary(max_size=80).map(lambda b: b.decode("latin-1")),
    st.integers(0, 64),
)
def test_dtype_codec_rejects_bad_descriptions_with_handle_error(code, itemsize):
    try:
        dt = _sharing.decode_dtype(code, itemsize)
    except ms.HandleError:
        return
    assert dt.itemsize == itemsize and not dt.hasobject


@pytest.mark.parametrize(
    "dt",
    [
        "<f8",
        ">i2",
        "|b1",
        "<M8[10us]",
        "<U7",
        "|S3",
        "|V5",
        np.dtype([("a", "<i4"), ("b", ">f8", (2, 3))]),
        np.dtype(
            {"names": ["p", "q"], "formats": ["u1", "<c16"], "offsets": [16, 0], "itemsize": 40}
        ),
        np.dtype([("outer", [("inner", "<i8", (2,))])]),
    ],
    ids=str,
)
def test_dtype_codec_round_trips(dt):
    dt = np.dtype(dt)
    code = _sharing.encode_dtype(dt)
    assert code is not None and _sharing.decode_dtype(code, dt.itemsize) == dt


@pytest.mark.parametrize(
    "code",
    [
        "|O",
        '{"n":["a"],"f":["|O"],"o":[0],"i":8}',
        "__import__('os').system('true')",
        '{"n":["a"],"f":["<f8"],"o":[-1],"i":8}',
        '{"b":"<f8","s":[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33]}',
        "[" * 5000,
    ],
)
def test_dtype_codec_refuses_objects_and_code(code):
    with pytest.raises(ms.HandleError):
        _sharing.decode_dtype(code, 8)


def test_objects_that_cannot_travel_by_handle_go_by_value():
    titled = np.zeros(3, dtype=[(("title", "a"), "<i4")])
    assert _sharing.encode_dtype(titled.dtype) is None
    back = ms.loads(ms.dumps(titled))
    assert back.dtype == titled.dtype and not ms.is_shared(back)
    f = io.BytesIO()
    pickle.dump(ms.loads(ms.dumps([1, "x"])), f)
    assert pickle.loads(f.getvalue()) == [1, "x"]


# --- the pools follow the same rule ---------------------------------------------------


def test_one_share_threshold_default_everywhere():
    import memshare.dask
    from memshare import _allocator, _sharing
    from memshare._pool import DEFAULT_SHARE_THRESHOLD

    values = {
        _sharing.DEFAULT_SHARE_THRESHOLD,
        DEFAULT_SHARE_THRESHOLD,
        _allocator.DEFAULT_THRESHOLD,
        memshare.dask.DEFAULT_SHARE_THRESHOLD,
    }
    assert values == {1 << 20}
    with ms.Pool(1) as pool:
        assert pool._share_threshold == _sharing.DEFAULT_SHARE_THRESHOLD


def test_a_calls_pins_belong_to_its_lease_and_end_with_it():
    from memshare import _sharing

    big = np.arange(1 << 18, dtype=np.float64)  # 2 MiB: copied once, sent by handle
    lease = _native.Lease()
    memo = _sharing.CallMemo()
    before = ms.stats()["pins"]
    rv, copied = _sharing.reduce_call_argument(big, memo, 1 << 20, lease)
    again, copied_again = _sharing.reduce_call_argument(big, memo, 1 << 20, lease)
    assert copied and not copied_again  # once per call
    # The copy lives as long as the call: from the first time on, one message
    # whose pin the lease keeps.
    assert rv == again and ms.stats()["pins"] == before + 1
    third, _ = _sharing.reduce_call_argument(big, memo, 1 << 20, lease)
    assert third == again and ms.stats()["pins"] == before + 1
    for _ in range(3):  # opens leave a kept pin in place
        back = third[0](*third[1])
        assert np.array_equal(back, big) and not ms.is_shared(back)  # copy-on-write
    assert ms.stats()["pins"] == before + 1
    # An array already in shared memory: the first message is for one
    # receiver (a stream of arrays keeps nothing), the second on kept.
    shared = ms.share(big)
    first, _ = _sharing.reduce_call_argument(shared, memo, 1 << 20, lease)
    second, _ = _sharing.reduce_call_argument(shared, memo, 1 << 20, lease)
    assert first != second and ms.stats()["pins"] == before + 3
    del shared, first, second, back
    # The call ends without any worker opening its messages: its lease goes.
    del lease, rv, again, third, memo
    gc.collect()
    assert ms.stats()["pins"] == before


def test_only_a_calls_first_copies_keep_their_pins_from_the_first_task():
    """A call that streams many private arrays copies each once; only the
    first CallMemo.OWNED_KEPT of them get a kept pin at once, so such a call
    does not fill the pin table with pins nobody will open again."""
    from memshare import _sharing

    lease = _native.Lease()
    memo = _sharing.CallMemo()
    arrays = [np.full(1 << 15, float(i)) for i in range(memo.OWNED_KEPT + 4)]  # 256 KiB
    before = ms.stats()["pins"]
    sent = [_sharing.reduce_call_argument(a, memo, 1 << 10, lease)[0] for a in arrays]
    assert ms.stats()["pins"] == before + len(arrays)
    for a, rv in zip(arrays, sent, strict=True):
        back = rv[0](*rv[1])  # what the worker does with the message
        assert np.array_equal(back, a) and not ms.is_shared(back)  # copy-on-write
        del back
    # Opening consumed the pins of the later ones; the first ones' stay kept.
    assert ms.stats()["pins"] == before + memo.OWNED_KEPT
    del lease, memo, sent
    gc.collect()
    assert ms.stats()["pins"] == before


def test_task_results_over_the_threshold_are_copied_once_and_go_by_handle():
    from memshare import _sharing

    small, big = np.ones(10), np.ones(1 << 18)
    assert _sharing.reduce_task_result(small, 1 << 20) == (NotImplemented, False)
    rv, copied = _sharing.reduce_task_result(big, 1 << 20)
    assert copied
    back = rv[0](*rv[1])  # what the parent does with the message
    assert ms.is_shared(back) and np.array_equal(back, big)
    nested, copies = _sharing.share_task_result({"a": [big, small], "b": (big,)}, 1 << 20)
    assert copies == 2 and ms.is_shared(nested["a"][0]) and not ms.is_shared(nested["a"][1])
    del rv, back, nested
