"""SharedArray: dtypes, layouts, pickling, processes, lifetime, bad input."""

from __future__ import annotations

import concurrent.futures
import gc
import multiprocessing as mp
import pickle
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import memshare as ms
from memshare import _native, dumps, loads

TIMEOUT = 120

DTYPES = [
    "?",
    "i1", "i2", "i4", "i8",
    "u1", "u2", "u4", "u8",
    "f2", "f4", "f8",
    "c8", "c16",
    "M8[ns]", "M8[us]", "M8[D]", "M8[Y]",
    "m8[ns]", "m8[s]",
    "S7", "U5", "V12",
    ">i4", ">f8",
    np.dtype([("x", "f8"), ("y", "i4"), ("name", "U3")]),
    np.dtype({"names": ["a", "b"], "formats": ["u1", "f8"], "offsets": [0, 16], "itemsize": 32}),
    np.dtype([("pos", "f4", (3,)), ("inner", [("a", "i2"), ("b", "?")])]),
]  # fmt: skip


def sample(dtype, shape=(6, 5)) -> np.ndarray:
    dt = np.dtype(dtype)
    raw = np.random.default_rng(7).integers(0, 256, size=int(np.prod(shape)) * dt.itemsize)
    arr = raw.astype(np.uint8).view(dt).reshape(shape)
    if dt.kind in "fc":  # keep NaN payloads out of equality checks
        arr = np.arange(np.prod(shape)).reshape(shape).astype(dt)
    if dt.kind == "b":
        arr = np.arange(np.prod(shape)).reshape(shape) % 3 == 0
    return arr


def layouts(a: np.ndarray) -> dict[str, np.ndarray]:
    return {"C": a, "F": np.asfortranarray(a), "strided": a[::2, ::-2], "T": a.T}


def equal(a, b) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.names:  # padding bytes between fields are undefined: compare fields
        return all(equal(np.asarray(a[n]), np.asarray(b[n])) for n in a.dtype.names)
    return a.tobytes() == b.tobytes()


# --- workers (module level so spawn/forkserver children can import them) ---


def child_echo_checksum(arr):
    return (
        type(arr).__name__,
        str(arr.dtype),
        arr.shape,
        arr.tobytes(),
        ms.is_shared(arr),
    )


def contents(a: np.ndarray):
    """Bytes of every element; fields separately (padding between them is undefined)."""
    if a.dtype.names:
        return [contents(np.asarray(a[n])) for n in a.dtype.names]
    return a.tobytes()


def child_copies(arrays):
    return [(a.dtype.str, a.shape, contents(a), ms.is_shared(a), type(a).__name__) for a in arrays]


def child_write(arr, value):
    arr[...] = value
    return ms.is_shared(arr)


def child_sum(arr):
    return float(arr.sum()), ms.is_shared(arr)


def child_try_write(arr):
    try:
        arr[0] = 1
    except ValueError as e:
        return str(e)
    return "wrote"


def child_make_shared(n):
    out = ms.zeros(n)
    out[:] = np.arange(n)
    return out


def child_roundtrip_queue(q_in, q_out):
    arr = q_in.get(timeout=TIMEOUT)
    q_out.put((ms.is_shared(arr), float(arr.sum())))


# --- values, dtypes, layouts -------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_share_roundtrips_every_dtype_and_layout(dtype):
    for name, a in layouts(sample(dtype)).items():
        s = ms.share(a)
        assert isinstance(s, ms.SharedArray) and ms.is_shared(s)
        assert equal(np.asarray(s), a), (dtype, name)
        back = ForkingPickler.loads(ForkingPickler.dumps(s))
        assert equal(np.asarray(back), a), (dtype, name)
        assert np.shares_memory(back, s), "a transport maps the same memory"
        kept = pickle.loads(pickle.dumps(s, protocol=pickle.HIGHEST_PROTOCOL))
        assert type(kept) is np.ndarray and equal(kept, a), (dtype, name)
        assert not ms.is_shared(kept), "plain pickling keeps the data"
        if name == "F":
            assert s.flags.f_contiguous


@pytest.mark.parametrize("dtype", ["f8", "M8[ms]", "U4", DTYPES[-3]], ids=str)
def test_values_cross_processes(ctx, dtype):
    a = sample(dtype, (40, 7))
    views = {"whole": ms.share(a)}
    views["slice"] = views["whole"][3:30:3, ::-1]
    with ctx.Pool(1) as pool:
        for name, v in views.items():
            kind, dt, shape, data, shared = pool.apply_async(child_echo_checksum, (v,)).get(TIMEOUT)
            assert (dt, shape, data) == (str(v.dtype), v.shape, v.tobytes()), name
            assert kind == "SharedArray" and shared, f"{name} was copied, not mapped"


def test_every_dtype_and_layout_cross_processes(ctx):
    sent = [
        ms.share(v) if name != "view" else ms.share(a)[1::2, ::-1]
        for a in (sample(dt) for dt in DTYPES)
        for name, v in {**layouts(a), "view": a}.items()
    ]
    with ctx.Pool(1) as pool:
        got = pool.apply_async(child_copies, (sent,)).get(TIMEOUT)
    assert len(got) == len(sent)
    for s, (dtype, shape, data, shared, kind) in zip(sent, got, strict=True):
        assert shared and kind == "SharedArray", s.dtype
        assert (dtype, shape, data) == (s.dtype.str, s.shape, contents(s)), s.dtype


def test_writes_in_child_are_seen_by_parent(ctx):
    a = ms.zeros((1000, 10))
    p = ctx.Process(target=child_write, args=(a[10:20], 7.0))
    p.start()
    p.join(TIMEOUT)
    assert p.exitcode == 0
    assert a[10:20].sum() == 7.0 * 100 and a.sum() == 7.0 * 100


def test_readonly_in_every_process(ctx):
    a = ms.share(np.arange(10), readonly=True)
    with pytest.raises(ValueError, match="read-only"):
        a[0] = 5
    with pytest.raises(ValueError):
        a.flags.writeable = True
    with ctx.Pool(1) as pool:
        msg = pool.apply_async(child_try_write, (a,)).get(TIMEOUT)
    assert "read-only" in msg


def test_worker_results_in_shared_memory_come_back_zero_copy(ctx):
    with ctx.Pool(2) as pool:
        res = pool.map_async(child_make_shared, [10, 1000]).get(TIMEOUT)
    assert all(isinstance(r, ms.SharedArray) and ms.is_shared(r) for r in res)
    assert res[1].sum() == sum(range(1000))


def test_stdlib_queue_and_executor_move_handles(ctx):
    a = ms.share(np.ones(100_000))
    q_in, q_out = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=child_roundtrip_queue, args=(q_in, q_out))
    p.start()
    q_in.put(a)
    assert q_out.get(timeout=TIMEOUT) == (True, 100_000.0)
    p.join(TIMEOUT)
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
        assert ex.submit(child_sum, a).result(TIMEOUT) == (100_000.0, True)


def test_transported_size_is_constant_for_1gb():
    big = ms.empty(1 << 27)  # 1 GiB of float64, pages untouched
    small = ms.empty(10)
    for obj in (big, big[5:-5:3], small):
        data = bytes(ForkingPickler.dumps(obj))
        assert len(data) < 256, len(data)
        back = ForkingPickler.loads(data)
        assert back.shape == obj.shape and np.shares_memory(back, obj)
        del back
    assert ms.stats()["pins"] == 0


def test_arithmetic_results_pickle_as_plain_arrays():
    a = ms.share(np.arange(5.0))
    b = a * 2
    assert type(b) is np.ndarray and not ms.is_shared(b)
    assert isinstance(pickle.loads(pickle.dumps(b)), np.ndarray)
    assert np.array_equal(pickle.loads(pickle.dumps(b)), [0, 2, 4, 6, 8])
    assert float(a.sum()) == 10.0 and type(a.sum()) is not ms.SharedArray


def test_allocators():
    e = ms.empty((3, 4), "i4")
    assert e.shape == (3, 4) and e.dtype == np.int32 and ms.is_shared(e)
    z = ms.zeros((2, 3), order="F")
    assert z.flags.f_contiguous and not z.any()
    f = ms.full(5, 2.5)
    assert f.dtype == np.float64 and (f == 2.5).all()
    src = np.asfortranarray(np.ones((4, 5), "f4"))
    for like, check in ((ms.empty_like, None), (ms.zeros_like, 0), (ms.full_like, 9)):
        args = (src,) if check is None or check == 0 else (src, check)
        out = like(*args)
        assert out.shape == src.shape and out.dtype == src.dtype and out.flags.f_contiguous
        if check is not None:
            assert (out == check).all()


def test_memory_is_freed_when_last_reference_goes():
    base = ms.stats()["live_blocks"]
    a = ms.share(np.ones(1_000_000))
    view = a[::2]
    del a
    gc.collect()
    assert ms.stats()["live_blocks"] == base + 1, "a view keeps the block alive"
    del view
    gc.collect()
    assert ms.stats()["live_blocks"] == base


def test_share_drop_cycles_do_not_grow():
    import resource

    src = np.ones(1000)
    for _ in range(500):  # warm up
        ms.share(src)
    gc.collect()
    s0, rss0 = ms.stats(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(10_000):
        a = ms.share(src)
        pickle.loads(pickle.dumps(a))
        del a
    gc.collect()
    s1, rss1 = ms.stats(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert s1["bytes_reserved"] == s0["bytes_reserved"]
    assert s1["live_blocks"] == s0["live_blocks"] and s1["pins"] == s0["pins"]
    assert rss1 - rss0 < 20_000, f"RSS grew by {rss1 - rss0} KiB"


# --- bad input ---------------------------------------------------------------


def test_object_dtype_is_refused():
    with pytest.raises(TypeError, match="object"):
        ms.share(np.array(["a", None], dtype=object))
    with pytest.raises(TypeError):
        ms.empty(3, dtype=object)


def test_forged_and_truncated_messages_raise():
    a = ms.share(np.arange(100))
    raw = ms.dumps(a)
    with pytest.raises(ms.HandleError):
        ms.loads(raw[:30])
    table_end = len(raw) - len(_native.decode_message(raw)[1])  # adopts the pin
    for pos in range(0, table_end, 7):
        bad = bytearray(raw)
        bad[pos] ^= 0xFF
        with pytest.raises(ms.HandleError):
            ms.loads(bytes(bad))
    with pytest.raises(ms.HandleError):
        _native.open_handle(b"\x01" + b"\x00" * 63)
    with pytest.raises(ms.HandleError):
        _native.open_handle(b"garbage")
    with pytest.raises(ms.HandleError, match="not a memshare message"):
        ms.loads(pickle.dumps(a))
    assert ms.stats()["pins"] == 0


def test_stale_handle_raises():
    a = ms.share(np.arange(10))
    raw = ms.dumps(a)
    assert ms.loads(raw)[3] == 3  # adopts the pin
    del a
    gc.collect()
    with pytest.raises(ms.StaleHandleError, match="freed"):
        ms.loads(raw)


def test_memshare_dumps_places_large_buffers_in_shared_memory():
    plain = np.arange(200_000, dtype="f8")
    dates = np.arange(200_000).astype("M8[ns]")  # numpy pickles these in-band
    obj = {"shared": ms.share(np.ones(10)), "plain": plain, "dates": dates, "small": b"x" * 10}
    data = dumps(obj)
    assert len(data) < 1000
    back = loads(data)
    assert all(ms.is_shared(back[k]) for k in ("shared", "plain", "dates"))
    assert np.array_equal(back["plain"], plain) and np.array_equal(back["dates"], dates)
    assert back["small"] == b"x" * 10
    big = bytearray(2 << 20)  # out-of-band buffers of other objects go by handle too
    back = loads(dumps(pickle.PickleBuffer(big)))
    assert bytes(back) == bytes(big) and ms.is_shared(back)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        dtype=st.one_of(
            hnp.boolean_dtypes(),
            hnp.integer_dtypes(),
            hnp.unsigned_integer_dtypes(),
            hnp.floating_dtypes(),
            hnp.complex_number_dtypes(),
            hnp.datetime64_dtypes(),
            hnp.timedelta64_dtypes(),
            hnp.byte_string_dtypes(),
            hnp.unicode_string_dtypes(),
        ),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
    ),
    st.booleans(),
)
def test_hypothesis_roundtrip(arr, fortran):
    if fortran:
        arr = np.asfortranarray(arr)
    s = ms.share(arr)
    back = pickle.loads(pickle.dumps(s))
    # By value, exactly as numpy pickles the same private array (numpy
    # itself turns a 0-d '>i2' into native 'int16').
    expected = pickle.loads(pickle.dumps(arr))
    assert type(back) is np.ndarray and not ms.is_shared(back)
    assert back.dtype == expected.dtype and back.shape == arr.shape
    assert back.tobytes() == expected.tobytes()
    sent = ForkingPickler.loads(ForkingPickler.dumps(s))
    assert sent.dtype == arr.dtype and sent.tobytes() == arr.tobytes()


def test_pool_of_stdlib_over_fork_start_methods_matches_sequential():
    a = ms.share(np.random.default_rng(0).random((64, 1000)))
    expected = [float(row.sum()) for row in a]
    with mp.get_context("spawn").Pool(2) as pool:
        got = pool.map_async(child_sum, list(a)).get(TIMEOUT)
    assert [g[0] for g in got] == pytest.approx(expected)
    assert all(g[1] for g in got)


def test_children_detach_cleanly_at_exit(ctx):
    a = ms.share(np.ones(10))
    before = ms.stats()["processes"]
    p = ctx.Process(target=child_sum, args=(a,))
    p.start()
    p.join(TIMEOUT)
    assert p.exitcode == 0
    # No reap needed: the child gave its slot and references back on exit.
    s = ms.stats()
    assert s["processes"] == before and s["live_blocks"] >= 1
