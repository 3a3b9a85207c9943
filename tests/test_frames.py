"""pandas, pyarrow and polars objects in shared memory (issue 3).

Every test runs real processes with the real memshare core: a frame is shared
in the parent, travels to workers through the standard library's pickling
(``multiprocessing`` and ``concurrent.futures``), and the workers check that
what they received is equal and lies in memshare memory.
"""

from __future__ import annotations

import concurrent.futures
import gc
import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import textwrap
import time
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest

pd = pytest.importorskip("pandas")
pa = pytest.importorskip("pyarrow")
pl = pytest.importorskip("polars")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import memshare  # noqa: E402
from memshare import _frames  # noqa: E402
from memshare._array import is_shared, share_array  # noqa: E402
from memshare._frames import _objects  # noqa: E402

TIMEOUT = 120  # seconds, for every blocking call
PANDAS3 = int(pd.__version__.split(".")[0]) >= 3
STR = "str" if PANDAS3 else "string[pyarrow]"  # pandas 3's default string dtype
needs_cow = pytest.mark.skipif(
    not PANDAS3,
    reason="pandas 2.x without Copy-on-Write writes in place (into read-only shared memory)",
)
START_METHODS = [m for m in ("fork", "spawn", "forkserver") if m in mp.get_all_start_methods()]
MB = 1 << 20


# --------------------------------------------------------------------------
# helpers (module level: workers import this module)
# --------------------------------------------------------------------------


def _ensure_reducers() -> None:
    """Reducers for pandas/pyarrow/polars on the stdlib pickler (idempotent)."""
    _frames.install()


def share(obj):
    _ensure_reducers()
    out = _frames.share_frame(obj, share_array)
    assert out is not NotImplemented
    return out


def fp_dumps(obj) -> bytes:
    _ensure_reducers()
    return bytes(ForkingPickler.dumps(obj))


def mixed_frame(n: int = 12, seed: int = 0):
    """A frame with a column of every dtype issue 3 lists, and awkward labels."""
    rng = np.random.default_rng(seed)
    cols = {}
    for dt in ["i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8"]:
        cols[dt] = rng.integers(0, 100, n).astype(dt)
    cols["bool"] = rng.integers(0, 2, n).astype(bool)
    for unit in ["s", "ms", "us", "ns"]:
        cols[f"dt_{unit}"] = pd.date_range("2020-01-01", periods=n, freq="h", unit=unit)
        cols[f"dttz_{unit}"] = pd.date_range(
            "2020-03-29", periods=n, freq="h", tz="Europe/Paris", unit=unit
        )
    cols["dt_nat"] = pd.Series(pd.date_range("2020", periods=n)).where(np.arange(n) % 3 != 1)
    cols["td"] = pd.to_timedelta(rng.integers(0, 10**6, n), unit="ms")
    cols["period"] = pd.period_range("2020-01", periods=n, freq="M")
    cols["interval"] = pd.arrays.IntervalArray.from_breaks(np.arange(n + 1) * 1.5)
    cols["cat"] = pd.Categorical(rng.choice(list("abc"), n), categories=list("cba"))
    cols["cat_ord"] = pd.Categorical(rng.choice([1, 2, 3], n), ordered=True)
    na = np.arange(n) % 3 == 2
    for dt in ["Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64"]:
        cols[dt] = pd.array([None if m else i % 100 for i, m in enumerate(na)], dtype=dt)
    for dt in ["Float32", "Float64"]:
        cols[dt] = pd.array([None if m else i / 4 for i, m in enumerate(na)], dtype=dt)
    cols["boolean"] = pd.array(
        [None if m else i % 2 == 0 for i, m in enumerate(na)], dtype="boolean"
    )
    strs = [None if m else f"s{i}\u00e9\u4e2d" * (i % 4) for i, m in enumerate(na)]
    cols["str"] = pd.Series(strs, dtype="str")
    cols["string_pa"] = pd.array(strs, dtype="string[pyarrow]")
    cols["string_py"] = pd.array(strs, dtype="string[python]")
    cols["obj_str"] = pd.Series(strs, dtype=object)
    cols["obj_nan"] = pd.Series([np.nan if m else f"x{i}" for i, m in enumerate(na)], dtype=object)
    cols["obj_py"] = pd.Series([{"k": i} if i % 2 else (i, "x") for i in range(n)], dtype=object)
    cols["arrow_i"] = pd.array([None if m else i for i, m in enumerate(na)], dtype="int64[pyarrow]")
    cols["arrow_list"] = pd.Series(
        [None if m else list(range(i % 5)) for i, m in enumerate(na)],
        dtype=pd.ArrowDtype(pa.list_(pa.int32())),
    )
    cols["arrow_struct"] = pd.Series(
        [{"a": i, "b": str(i)} for i in range(n)],
        dtype=pd.ArrowDtype(pa.struct([("a", pa.int64()), ("b", pa.string())])),
    )
    cols["arrow_ts"] = pd.Series(pd.date_range("2021", periods=n, tz="UTC", unit="us")).astype(
        pd.ArrowDtype(pa.timestamp("us", tz="UTC"))
    )
    cols["arrow_dict"] = pd.Series(
        pa.array(rng.choice(list("xyz"), n).tolist()).dictionary_encode(),
        dtype=pd.ArrowDtype(pa.dictionary(pa.int32(), pa.string())),
    )
    df = pd.DataFrame(cols)
    df[("tuple", 1)] = np.arange(n, dtype="f8")
    df[7] = np.arange(n)
    df[None] = np.arange(n, dtype="f4")
    df = pd.concat([df, df[["i8", "str"]]], axis=1)  # duplicate column names
    df.index = pd.MultiIndex.from_arrays(
        [
            pd.date_range("2020", periods=n, tz="Asia/Tokyo"),
            [f"r{i}" for i in range(n)],
        ],
        names=["when", ("who", 2)],
    )
    df.attrs = {"source": "test", "n": n}
    return df


def big_mixed_frame(nbytes: int, seed: int = 0):
    """A ~nbytes frame: floats, ints, str (Arrow), categorical, datetime."""
    n = max(1, nbytes // 64)  # 8+8+4+8 numeric bytes, ~30 string bytes, 1 code byte
    rng = np.random.default_rng(seed)
    words = np.array([f"word-{i:06d}-{'x' * (i % 20)}" for i in range(1000)], dtype=object)
    return pd.DataFrame(
        {
            "f8": rng.random(n),
            "i8": rng.integers(0, 1 << 40, n),
            "f4": rng.random(n, dtype=np.float32),
            "when": pd.date_range("2000-01-01", periods=n, freq="s"),
            "str": pd.array(words[rng.integers(0, len(words), n)], dtype=STR),
            "cat": pd.Categorical.from_codes(
                rng.integers(0, 8, n).astype("i1"), categories=list("abcdefgh")
            ),
        }
    )


def frame_nbytes(df) -> int:
    return int(df.memory_usage(index=True, deep=False).sum())


def column_buffers(values) -> list:
    """The data buffers behind a column's values (numpy arrays / Arrow buffers).

    Written independently of memshare's own decomposition; object columns
    hold Python objects and have no data buffer.
    """
    if isinstance(values, pd.MultiIndex):
        return list(values.codes) + [b for lev in values.levels for b in column_buffers(lev)]
    if isinstance(values, pd.RangeIndex):
        return []
    if isinstance(values, (pd.Series, pd.Index)):
        values = values.array if isinstance(values, pd.Series) else values._data
    if isinstance(values, pd.arrays.NumpyExtensionArray):
        values = values.to_numpy()
    if isinstance(values, np.ndarray):
        return [] if values.dtype == object else [values]
    if isinstance(values, pd.Categorical):
        return [values.codes, *column_buffers(values.categories)]
    if isinstance(
        values, (pd.arrays.DatetimeArray, pd.arrays.TimedeltaArray, pd.arrays.PeriodArray)
    ):
        return [values.asi8]
    if isinstance(values, pd.arrays.IntervalArray):
        return column_buffers(values.left) + column_buffers(values.right)
    if hasattr(values, "_pa_array"):
        chunked = values.__arrow_array__()
        return [b for c in chunked.chunks for b in c.buffers() if b is not None and b.size]
    if isinstance(values, pd.api.extensions.ExtensionArray) and hasattr(values, "_mask"):
        return [values._data, values._mask]
    if isinstance(values, pd.arrays.StringArray):
        return []  # python-backed strings are Python objects
    raise AssertionError(f"no buffer walk for {type(values)}")


def unshared_buffers(df) -> list:
    """Names of the columns (and 'index') whose data buffers are not shared."""
    bad = []
    for i in range(df.shape[1]):
        col = df.iloc[:, i]
        for buf in column_buffers(col):
            if len(col) and not is_shared(buf):
                bad.append(df.columns[i])
    for level in df.index.levels if isinstance(df.index, pd.MultiIndex) else [df.index]:
        if isinstance(level, pd.RangeIndex):
            continue
        for buf in column_buffers(level):
            if len(level) and not is_shared(buf):
                bad.append(("index", level.name))
    return bad


def arrow_buffers(obj) -> list:
    if isinstance(obj, (pa.Table, pa.RecordBatch)):
        return [b for c in obj.columns for b in arrow_buffers(c)]
    if isinstance(obj, pa.ChunkedArray):
        return [b for c in obj.chunks for b in arrow_buffers(c)]
    out = [b for b in obj.buffers() if b is not None and b.size]
    if isinstance(obj, pa.DictionaryArray):
        out += arrow_buffers(obj.dictionary)
    return out


def polars_buffers(obj) -> dict:
    """Arrow buffers of each polars column as polars exports them (zero-copy)."""
    frame = obj.to_frame() if isinstance(obj, pl.Series) else obj
    table = frame.to_arrow(compat_level=pl.CompatLevel.newest())
    return {name: arrow_buffers(table.column(name)) for name in table.column_names}


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise AssertionError("no Pss line")


def bytes_in_use() -> int:
    return int(memshare.stats()["bytes_in_use"])


def wait_all_freed(timeout: float = 30.0) -> int:
    """Collect garbage until no memshare memory is in use (or time out)."""
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        used = bytes_in_use()
        if used == 0 or time.monotonic() > deadline:
            return used
        time.sleep(0.05)


# ---- worker functions ---------------------------------------------------


def worker_check_frame(df, expected_bytes: bytes):
    """Receive a frame, compare it with the pickled original, send it back."""
    _ensure_reducers()
    expected = pickle.loads(expected_bytes)
    pd.testing.assert_frame_equal(df, expected, check_exact=True)
    assert df.attrs == expected.attrs
    return df, unshared_buffers(df)


def worker_roundtrip(obj):
    _ensure_reducers()
    return obj


def worker_compare(obj, expected_bytes: bytes) -> str:
    _ensure_reducers()
    expected = pickle.loads(expected_bytes)
    if isinstance(obj, pd.DataFrame):
        pd.testing.assert_frame_equal(obj, expected, check_exact=True)
        return repr(unshared_buffers(obj))
    if isinstance(obj, pd.Series):
        pd.testing.assert_series_equal(obj, expected, check_exact=True)
        return repr(unshared_buffers(obj.to_frame()))
    if isinstance(obj, pd.Index):
        pd.testing.assert_index_equal(obj, expected, exact=True, check_exact=True)
        bad = [b for b in column_buffers(obj) if len(obj) and not is_shared(b)]
        return f"{len(bad)} unshared"
    if isinstance(obj, (pl.DataFrame, pl.Series)):
        assert obj.equals(expected), (obj, expected)
        return "ok"
    assert obj.equals(expected)
    bad = [b for b in arrow_buffers(obj) if not is_shared(b)]
    return f"{len(bad)} unshared"


def worker_write(df) -> bool:
    """Write to a received frame in every way; nothing may fail."""
    _ensure_reducers()
    df.iloc[0, 0] = 99
    df.loc[df.index[1], "f8"] = -1.0
    df["i8"] = df["i8"] + 1
    df.loc[df.index[0], "Int64"] = 42
    df.loc[df.index[0], "str"] = "changed"
    df.loc[df.index[0], "cat"] = "b"
    df.loc[df.index[0], "obj_str"] = "changed"
    df.fillna({"Float64": 0.5}, inplace=True)
    col = df["f4"]
    del df
    gc.collect()
    col.iloc[0] = 123.0  # a column view outliving its frame is still a snapshot
    return True


def worker_sum_numeric(df) -> float:
    return float(sum(df[c].sum() for c in df.columns if df[c].dtype.kind in "fi"))


def read_every_column(df) -> float:
    """Touch every byte of every column without large temporary results."""
    total = 0.0
    for i in range(df.shape[1]):
        col = df.iloc[:, i]
        if isinstance(col.dtype, pd.CategoricalDtype):
            total += float(col.cat.codes.to_numpy().sum())
        elif col.dtype.kind in "fiuM":
            values = col.to_numpy()
            total += float((values.view("i8") if values.dtype.kind == "M" else values).sum())
        else:
            for chunk in col.array.__arrow_array__().chunks:
                for start in range(0, len(chunk), 1 << 16):
                    piece = chunk.slice(start, 1 << 16)
                    total += pa.compute.sum(pa.compute.utf8_length(piece)).as_py() or 0
    return total


def worker_hold_and_read(q, ready, done):
    """Receive frames, read every column, report, hold until told to stop."""
    _ensure_reducers()
    warm = q.get(timeout=TIMEOUT)  # a small frame: imports and caches settle
    read_every_column(warm)
    del warm
    gc.collect()
    ready.put(("warm", os.getpid()))
    df = q.get(timeout=TIMEOUT)
    total = read_every_column(df)
    ready.put((os.getpid(), total, unshared_buffers(df)))
    done.wait(TIMEOUT)
    del df


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------


def test_share_mixed_frame_locally():
    df = mixed_frame()
    s = share(df)
    assert type(s) is pd.DataFrame
    pd.testing.assert_frame_equal(s, df, check_exact=True)
    assert s.attrs == df.attrs
    assert unshared_buffers(s) == []
    # Object columns keep their dtype (strings are stored in Arrow buffers).
    assert s["obj_str"].dtype == object and s["obj_py"].dtype == object
    # Not consolidated: one block per original block.
    assert len(s._mgr.blocks) == len(df._mgr.blocks)
    # The public entry point goes through the same code.
    via_ms = memshare.share(df)
    pd.testing.assert_frame_equal(via_ms, df, check_exact=True)
    assert unshared_buffers(via_ms) == []


def test_pickled_frame_is_small_and_zero_copy():
    # Everything but the column of arbitrary objects, which is pickled in-band.
    df = mixed_frame(20_000).drop(columns="obj_py")
    s = share(df)
    data = fp_dumps(s)
    back = ForkingPickler.loads(data)
    assert len(data) < 0.01 * frame_nbytes(df), len(data)
    pd.testing.assert_frame_equal(back, df, check_exact=True)
    assert unshared_buffers(back) == []


@pytest.mark.parametrize("method", START_METHODS)
def test_mixed_frame_through_pool(method):
    df = mixed_frame(50)
    s = share(df)
    expected = pickle.dumps(df)
    ctx = mp.get_context(method)
    with ctx.Pool(1) as pool:
        back, unshared = pool.apply_async(worker_check_frame, (s, expected)).get(TIMEOUT)
    assert unshared == []
    pd.testing.assert_frame_equal(back, df, check_exact=True)
    assert unshared_buffers(back) == []


@pytest.mark.parametrize("method", START_METHODS)
def test_objects_through_executor(method):
    objs = {
        "series": mixed_frame(9)["cat"],
        "series_str": pd.Series(["a", None, "ccc"], name=("x", 1), dtype="str"),
        "series_obj": pd.Series(
            ["a", None, "ccc"], dtype=object, index=pd.Index([3, 1, 2], name="k")
        ),
        "index_range": pd.RangeIndex(3, 30, 3, name="r"),
        "index_str": pd.Index(["x", "y", "z"], name=5),
        "index_dt": pd.date_range("2020", periods=5, freq="D", tz="UTC", name="d"),
        "index_multi": pd.MultiIndex.from_product([[1, 2], ["a", "b"]], names=["n", None]),
        "table": pa.table({"a": [1, 2, None], "s": ["x", None, "zz"], "l": [[1], [], None]}),
        "batch": pa.record_batch({"d": pa.array(["a", "b", "a"]).dictionary_encode()}),
        "array": pa.array([{"x": 1}, None, {"x": 3}]),
        "chunked": pa.chunked_array([[1.5, 2.5], [None]]),
        "polars_df": pl.DataFrame(
            {
                "a": [1, 2, 3],
                "s": ["x", None, "zz"],
                "c": pl.Series(["a", "b", "a"], dtype=pl.Categorical),
                "l": [[1], [], None],
            }
        ),
        "polars_series": pl.Series("p", [1.0, None, 3.0]),
    }
    if method == "fork":
        # polars' own thread pool does not survive fork: pl.from_arrow of a
        # categorical hangs in a forked child even without memshare.
        objs = {k: v for k, v in objs.items() if not k.startswith("polars")}
    shared = {k: share(v) for k, v in objs.items()}
    for k, v in shared.items():
        assert type(v) is type(objs[k]), k
    ctx = mp.get_context(method)
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
        futs = {k: ex.submit(worker_compare, shared[k], pickle.dumps(objs[k])) for k in objs}
        results = {k: f.result(TIMEOUT) for k, f in futs.items()}
        back = {k: ex.submit(worker_roundtrip, shared[k]).result(TIMEOUT) for k in objs}
    for k in ("table", "batch", "array", "chunked"):
        assert results[k] == "0 unshared", (k, results[k])
    for k in ("series", "series_str", "series_obj"):
        assert results[k] == "[]", (k, results[k])
    for k in ("index_str", "index_dt", "index_multi"):
        assert results[k] == "0 unshared", (k, results[k])
    for k, v in back.items():
        if isinstance(v, pd.Index):
            pd.testing.assert_index_equal(v, objs[k], exact=True, check_exact=True)
        elif isinstance(v, pd.Series):
            pd.testing.assert_series_equal(v, objs[k], check_exact=True)
        else:
            assert v.equals(objs[k]), k


def test_memshare_pickler():
    """memshare's own pickler (protocol 5) sends shared frames by handle too."""
    from memshare import dumps, loads

    _ensure_reducers()
    df = mixed_frame(5000).drop(columns="obj_py")
    data = dumps(share(df))
    back = loads(data)
    assert len(data) < 0.01 * frame_nbytes(df), len(data)
    pd.testing.assert_frame_equal(back, df, check_exact=True)
    assert unshared_buffers(back) == []
    # A frame not yet shared: its buffers of at least `threshold` bytes are
    # shared on the way.
    big = big_mixed_frame(8 * MB)
    data = dumps(big, threshold=64 * 1024)
    back = loads(data)
    assert len(data) < 0.01 * frame_nbytes(big), len(data)
    pd.testing.assert_frame_equal(back, big, check_exact=True)
    for name in ("f8", "i8", "str"):
        assert all(is_shared(b) for b in column_buffers(back[name])), name


def test_arrow_buffers_shared_and_pickled_by_handle():
    t = pa.table(
        {
            "i": pa.array(np.arange(100_000)),
            "s": pa.array([f"v{i}" for i in range(100_000)], pa.large_string()),
            "nested": pa.array([[{"a": i}] for i in range(100_000)]),
        }
    )
    s = share(t)
    assert s.equals(t)
    assert all(is_shared(b) for b in arrow_buffers(s))
    data = fp_dumps(s)
    assert len(data) < 0.01 * t.nbytes
    back = ForkingPickler.loads(data)
    assert back.equals(t) and all(is_shared(b) for b in arrow_buffers(back))
    # A small slice of a big array does not drag the whole buffers along.
    sl = share(pa.array(np.arange(1_000_000)).slice(10, 5))
    assert sl.to_pylist() == list(range(10, 15)) and sl.get_total_buffer_size() < 1000


def test_polars_zero_copy_where_polars_allows():
    df = pl.DataFrame(
        {
            "i": np.arange(10_000),
            "f": np.random.default_rng(0).random(10_000),
            "s": [f"string number {i}" for i in range(10_000)],
            "b": np.arange(10_000) % 2 == 0,
            "dt": pl.datetime_range(
                pl.datetime(2020, 1, 1),
                pl.datetime(2020, 1, 1) + pl.duration(seconds=9_999),
                "1s",
                eager=True,
            ),
            "l": [[i, i + 1] for i in range(10_000)],
        }
    )
    s = share(df)
    assert s.equals(df)
    bufs = polars_buffers(s)
    for name in ("i", "f", "s", "b", "dt", "l"):
        assert bufs[name] and all(is_shared(b) for b in bufs[name]), name
    data = fp_dumps(s)
    back = ForkingPickler.loads(data)  # every handle sent must be received
    assert back.equals(df)
    assert all(is_shared(b) for b in polars_buffers(back)["i"])
    assert len(data) < 0.01 * df.estimated_size()


def test_polars_types_documented_as_zero_copy():
    """docs/frames.md: every polars type is zero-copy but Categorical and Enum."""
    import datetime as dt
    import decimal

    n = 1000
    df = pl.DataFrame(
        {
            "Int8": pl.Series(np.arange(n) % 100, dtype=pl.Int8),
            "UInt32": pl.Series(np.arange(n), dtype=pl.UInt32),
            "Float32": pl.Series(np.arange(n), dtype=pl.Float32),
            "Boolean": pl.Series(np.arange(n) % 2 == 0),
            "String": pl.Series([f"s{i}" * 5 for i in range(n)]),
            "Binary": pl.Series([b"x" * (i % 30) for i in range(n)]),
            "Date": pl.Series([dt.date(2020, 1, 1)] * n),
            "Datetime_tz": pl.Series([dt.datetime(2020, 1, 1)] * n).dt.replace_time_zone("UTC"),
            "Duration": pl.Series([dt.timedelta(seconds=i) for i in range(n)]),
            "Time": pl.Series([dt.time(1, 2)] * n),
            "Decimal": pl.Series([decimal.Decimal("1.5")] * n, dtype=pl.Decimal(10, 2)),
            "List": pl.Series([[i, i] for i in range(n)]),
            "Array": pl.Series([[i, i] for i in range(n)], dtype=pl.Array(pl.Int64, 2)),
            "Struct": pl.Series([{"a": i, "b": str(i)} for i in range(n)]),
            "Nulls": pl.Series([None if i % 3 else i for i in range(n)]),
            "Categorical": pl.Series(["a", "b"] * (n // 2), dtype=pl.Categorical),
            "Enum": pl.Series(["a", "b"] * (n // 2), dtype=pl.Enum(["a", "b"])),
        }
    )
    s = share(df)
    assert s.equals(df)
    for name, bufs in polars_buffers(s).items():
        if name in ("Categorical", "Enum"):
            continue  # polars rebuilds its category mapping and copies these
        assert bufs and all(is_shared(b) for b in bufs), name


@needs_cow
@pytest.mark.parametrize("method", START_METHODS)
def test_receiver_writes_do_not_leak(method):
    df = mixed_frame(10).reset_index(drop=True)
    df = df.loc[:, ~df.columns.duplicated()]
    s = share(df)
    ctx = mp.get_context(method)
    with ctx.Pool(1) as pool:
        assert pool.apply_async(worker_write, (s,)).get(TIMEOUT) is True
        # A second receiver still sees the original data.
        back, _unshared = pool.apply_async(worker_check_frame, (s, pickle.dumps(df))).get(TIMEOUT)
    pd.testing.assert_frame_equal(s, df, check_exact=True)
    # The sender may write to its shared frame too; receivers keep their snapshot.
    s.iloc[0, 0] = 7
    pd.testing.assert_frame_equal(back, df, check_exact=True)


def test_pandas_operations_on_shared_frames():
    df = mixed_frame(40).reset_index(drop=True)
    df = df.loc[:, ~df.columns.duplicated()]
    s = ForkingPickler.loads(fp_dumps(share(df)))
    ops = [
        lambda d: d.groupby("cat", observed=True)["f8"].sum(),
        lambda d: d.groupby("str")[["i8", "Int64"]].mean(),
        lambda d: d.sort_values(["str", "f4"]),
        lambda d: d[["i8", "str"]].merge(d[["i8", "f8"]], on="i8"),
        lambda d: d["f8"].rolling(3).mean(),
        lambda d: d["Float64"].fillna(0),
        lambda d: d["obj_str"].str.len(),
        lambda d: d["str"].str.upper(),
        lambda d: d.describe(),
        lambda d: d.loc[d["f8"] > 10],
        lambda d: pd.concat([d, d]),
        lambda d: d[["i8", "f8"]].cumsum(),
        lambda d: d.set_index("str"),
        lambda d: d["dttz_ns"].dt.tz_convert("UTC"),
        lambda d: d.drop_duplicates(subset=["cat"]),
    ]
    for op in ops:
        a, b = op(df), op(s)
        if isinstance(a, pd.DataFrame):
            pd.testing.assert_frame_equal(a, b)
        else:
            pd.testing.assert_series_equal(a, b)


def test_known_pandas_limitation_nullable_cumsum():
    """docs/frames.md: pandas' masked cumsum writes into its input when NA is
    present, which read-only shared memory refuses. If this starts passing,
    pandas fixed it: drop the note from the docs."""
    s = share(pd.DataFrame({"I": pd.array([1, None, 3], dtype="Int64")}))
    with pytest.raises(ValueError, match="read-only"):
        s.cumsum()
    expected = pd.DataFrame({"I": pd.array([1, None, 4], dtype="Int64")})
    pd.testing.assert_frame_equal(s.copy().cumsum(), expected)  # the workaround


def test_sharing_a_shared_frame_does_not_copy():
    s = share(mixed_frame(100))
    before = bytes_in_use()
    again = share(s)
    pd.testing.assert_frame_equal(again, s, check_exact=True)
    for name in ("f8", "i4", "dt_ns", "Int64"):
        a, b = column_buffers(s[name]), column_buffers(again[name])
        assert all(np.shares_memory(x, y) for x, y in zip(a, b, strict=True)), name
    assert bytes_in_use() - before < 64 * 1024  # only object columns' fresh encodings


def test_object_strings_without_pyarrow(monkeypatch):
    """The pure-Python large_string codec matches pyarrow's, both ways."""
    values = np.array(["a", None, "\u00e9t\u00e9", "", None, "x" * 300], dtype=object)
    with_pa = _objects._encode_strings(values)
    monkeypatch.setattr(_objects, "_has_pyarrow", lambda: False)
    without = _objects._encode_strings(values)
    for a, b in zip(with_pa[:3], without[:3], strict=True):
        np.testing.assert_array_equal(a, b)
    decoded = _objects._decode_strings(len(values), *with_pa)
    assert decoded.tolist() == values.tolist()
    df = pd.DataFrame(
        {"s": pd.Series(values, dtype=object), "n": np.arange(6)},
        index=pd.Index(list("abcdef"), dtype=object),
    )
    assert df["s"].dtype == object
    back = ForkingPickler.loads(fp_dumps(share(df)))
    pd.testing.assert_frame_equal(back, df, check_exact=True)
    assert back.index.dtype == object and back["s"].dtype == object


def test_not_handled_types():
    assert _frames.share_frame(np.arange(3), share_array) is NotImplemented
    assert _frames.share_frame({"a": 1}, share_array) is NotImplemented
    assert _frames.reduce_frame(object()) is NotImplemented


def test_everything_freed_after_drop():
    gc.collect()
    base = bytes_in_use()
    df = mixed_frame(1000)
    s = share(df)
    data = fp_dumps(s)
    back = ForkingPickler.loads(data)
    with mp.get_context("spawn").Pool(1) as pool:
        pool.apply_async(worker_roundtrip, (s,)).get(TIMEOUT)
    assert bytes_in_use() > base
    del s, back, data
    assert wait_all_freed() == base


def test_imports_only_numpy():
    """memshare imports without pandas/pyarrow/polars and names what is missing."""
    code = textwrap.dedent(
        """
        import sys
        for name in ("pandas", "pyarrow", "polars"):
            sys.modules[name] = None  # makes `import name` fail
        import numpy as np
        import memshare
        from memshare import _frames
        from memshare._array import share_array
        assert _frames.share_frame(np.arange(3), share_array) is NotImplemented
        assert _frames.register_reducers(lambda t, f: None) == []
        try:
            _frames._spec._require("pandas")
        except ImportError as e:
            assert "pandas" in str(e), e
        else:
            raise AssertionError("no ImportError")
        for name in ("pandas", "pyarrow", "polars"):
            assert sys.modules[name] is None
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_reducers_registered_on_later_import():
    code = textwrap.dedent(
        """
        import sys
        from multiprocessing.reduction import ForkingPickler
        from memshare import _frames
        from memshare._array import share_array, is_shared
        assert "pandas" not in sys.modules
        _frames.register_reducers_on_import(ForkingPickler.register)
        import pandas as pd, numpy as np
        df = pd.DataFrame({"s": ["x" * 100] * 10_000}, dtype=object)
        df = _frames.share_frame(df, share_array)
        data = bytes(ForkingPickler.dumps(df))
        assert len(data) < 10_000, len(data)
        back = ForkingPickler.loads(data)
        pd.testing.assert_frame_equal(back, df)
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ---- Hypothesis ---------------------------------------------------------

COLUMN_KINDS = [
    "i1", "u2", "i8", "f4", "f8", "bool", "dt_ns", "dt_s_tz", "td", "period", "interval",
    "cat", "Int32", "Float64", "boolean", "str", "obj_str", "string_py", "arrow_f8",
    "arrow_str", "obj_mixed",
]  # fmt: skip
INDEX_KINDS = ["range", "int", "str", "obj_str", "datetime", "multi"]


@st.composite
def frames(draw, max_len: int = 100_000):
    n = draw(st.sampled_from([0, 1, 2, 7, 2000, max_len]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kinds = draw(st.lists(st.sampled_from(COLUMN_KINDS), min_size=0, max_size=8))
    missing = draw(st.booleans())
    na = rng.random(n) < 0.3 if missing else np.zeros(n, dtype=bool)
    if n <= 7:
        texts = draw(
            st.lists(st.text(st.characters(exclude_categories=["Cs"])), min_size=n, max_size=n)
        )
    else:
        texts = [f"t{i}-" + "\u00fc" * int(rng.integers(0, 5)) for i in range(n)]
    strs = [None if m else t for t, m in zip(texts, na, strict=True)]
    cols = {}
    for i, kind in enumerate(kinds):
        ints = rng.integers(0, 100, n)
        if kind in ("i1", "u2", "i8", "f4", "f8"):
            col = ints.astype(kind)
        elif kind == "bool":
            col = ints % 2 == 0
        elif kind == "dt_ns":
            col = pd.Series(pd.to_datetime(ints, unit="D")).where(~na)
        elif kind == "dt_s_tz":
            col = pd.Series(
                pd.to_datetime(ints, unit="h").as_unit("s").tz_localize("America/New_York")
            )
        elif kind == "td":
            col = pd.Series(pd.to_timedelta(ints, unit="s")).where(~na)
        elif kind == "period":
            col = pd.PeriodIndex.from_ordinals(ints, freq="D")
        elif kind == "interval":
            col = pd.arrays.IntervalArray.from_arrays(ints, ints + 1, closed="left")
        elif kind == "cat":
            col = pd.Categorical(np.array(list("abcd"))[ints % 4], ordered=bool(i % 2))
            if missing:
                col[na] = np.nan
        elif kind in ("Int32", "Float64", "boolean"):
            vals = (ints % 2 == 0) if kind == "boolean" else ints
            col = pd.array(
                [None if m else v for v, m in zip(vals.tolist(), na, strict=True)], dtype=kind
            )
        elif kind == "str":
            col = pd.Series(strs, dtype="str")
        elif kind == "obj_str":
            col = pd.Series(strs, dtype=object)
        elif kind == "string_py":
            col = pd.array(strs, dtype="string[python]")
        elif kind == "arrow_f8":
            col = pd.array(
                [None if m else v / 3 for v, m in zip(ints.tolist(), na, strict=True)],
                dtype="float64[pyarrow]",
            )
        elif kind == "arrow_str":
            col = pd.array(strs, dtype=pd.ArrowDtype(pa.string()))
        else:  # obj_mixed: pickled in-band
            col = pd.Series([(v,) if v % 2 else str(v) for v in ints.tolist()], dtype=object)
        cols[i] = col
    df = pd.DataFrame(cols)
    df.columns = [f"c{i}" for i in range(len(kinds))] if draw(st.booleans()) else df.columns
    kind = draw(st.sampled_from(INDEX_KINDS))
    if kind == "int":
        df.index = pd.Index(rng.permutation(n), name="i")
    elif kind == "str":
        df.index = pd.Index([f"r{i}" for i in range(n)], dtype="str")
    elif kind == "obj_str":
        df.index = pd.Index([f"r{i}" for i in range(n)], dtype=object, name=("o", 1))
    elif kind == "datetime":
        df.index = pd.date_range("2000", periods=n, freq="min", name="t")
    elif kind == "multi":
        df.index = pd.MultiIndex.from_arrays([np.arange(n) % 3, [f"m{i}" for i in range(n)]])
    return df


@pytest.fixture(scope="module")
def fork_pool():
    with mp.get_context("forkserver" if "forkserver" in START_METHODS else "spawn").Pool(1) as pool:
        yield pool


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(df=frames())
def test_hypothesis_frames_local(df):
    s = share(df)
    pd.testing.assert_frame_equal(s, df, check_exact=True)
    back = ForkingPickler.loads(fp_dumps(s))
    pd.testing.assert_frame_equal(back, df, check_exact=True)
    assert unshared_buffers(back) == []


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(df=frames())
def test_hypothesis_frames_through_process(fork_pool, df):
    s = share(df)
    res = fork_pool.apply_async(worker_compare, (s, pickle.dumps(df))).get(TIMEOUT)
    assert res == "[]", res


# ---- sizes and memory ---------------------------------------------------


def _pickled_size_check(nbytes: int) -> None:
    df = big_mixed_frame(nbytes)
    size = frame_nbytes(df)
    s = share(df)
    del df
    data = fp_dumps(s)
    ForkingPickler.loads(data)  # every handle sent must be received
    assert len(data) < 0.01 * size, (len(data), size)
    with mp.get_context("spawn").Pool(1) as pool:
        assert pool.apply_async(worker_sum_numeric, (s,)).get(TIMEOUT) == pytest.approx(
            worker_sum_numeric(s)
        )


def test_pickled_size_small():
    _pickled_size_check(32 * MB)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pickled_size_1gb():
    _pickled_size_check(1024 * MB)


def _pss_check(nbytes: int, method: str) -> None:
    df = big_mixed_frame(nbytes)
    size = frame_nbytes(df)
    s = share(df)
    del df
    gc.collect()
    ctx = mp.get_context(method)
    queues, ready, done = [ctx.Queue(), ctx.Queue()], ctx.Queue(), ctx.Event()
    workers = [ctx.Process(target=worker_hold_and_read, args=(q, ready, done)) for q in queues]
    for w in workers:
        w.start()
    try:
        warm = share(big_mixed_frame(MB))
        for q in queues:
            q.put(warm)
        assert sorted(ready.get(timeout=TIMEOUT)[0] for _ in workers) == ["warm", "warm"]
        del warm
        gc.collect()
        # Baseline: the parent holds the one shared copy, workers are idle.
        before = pss_kib(os.getpid()) + sum(pss_kib(w.pid) for w in workers)
        for q in queues:
            q.put(s)
        reports = [ready.get(timeout=TIMEOUT) for _ in workers]
        after = pss_kib(os.getpid()) + sum(pss_kib(w.pid) for w in workers)
        expected = read_every_column(s)
        for _pid, total, unshared in reports:
            assert unshared == []
            assert total == pytest.approx(expected)
        grown = (after - before) * 1024
        print(f"PSS: +{grown / MB:.1f} MB for a {size / MB:.0f} MB frame read by 2 workers")
        assert grown < 0.10 * size, (
            f"PSS grew by {grown / MB:.1f} MB for a {size / MB:.0f} MB frame"
        )
    finally:
        done.set()
        for w in workers:
            w.join(TIMEOUT)
            if w.is_alive():
                w.kill()


def test_pss_two_workers_small():
    _pss_check(256 * MB, "forkserver" if "forkserver" in START_METHODS else "spawn")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pss_two_workers_1gb():
    _pss_check(1024 * MB, "forkserver" if "forkserver" in START_METHODS else "spawn")


def test_sharing_a_shared_frame_copies_nothing():
    ms = memshare
    """Regression: read-only shared buffers found by address were taken for
    writable ones, so sharing (or sending through ms.Pool) a shared frame
    copied its Arrow string columns again."""
    n = 100_000
    df = pd.DataFrame(
        {
            "f": np.arange(n, dtype="f8"),
            "s": pd.Series([f"abc{i}" for i in range(n)], dtype="str"),
            "c": pd.Categorical(["a", "b"] * (n // 2)),
        }
    )
    shared = ms.share(df)
    in_use = ms.stats()["bytes_in_use"]
    again = ms.share(shared)
    column = ms.share(shared["s"])
    assert ms.stats()["bytes_in_use"] == in_use
    pd.testing.assert_frame_equal(again, df, check_exact=True)
    del again, column, shared
