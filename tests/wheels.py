"""Checks of the built wheels (`make wheel`, `make test-wheels`); not a pytest module.

    python tests/wheels.py audit dist/*.whl   # with .venv's Python (auditwheel installed)
    python tests/wheels.py requires           # the installed wheel's runtime dependencies
    python tests/wheels.py smoke              # with a fresh venv that has the wheel installed

``audit`` runs ``auditwheel show`` on each wheel and fails unless the wheel is
tagged manylinux_2_28 or older, auditwheel agrees with that tag, and the
extension carries no debug info. ``smoke`` runs the package from its install
(not the source tree): share, Pool map under fork, spawn and forkserver, a
Queue round trip through a child under each, all in a private segment
directory that must be empty once the processes are gone.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

TIMEOUT = 120  # seconds for any one blocking step, generous for a loaded machine
START_METHODS = ("fork", "spawn", "forkserver")
OLDEST_GLIBC = (2, 28)  # the newest manylinux tag a wheel may carry


# --- audit ------------------------------------------------------------------


def _manylinux_tags(text: str) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in re.findall(r"manylinux_(\d+)_(\d+)_x86_64", text)]


def audit(wheel: Path) -> None:
    from elftools.elf.elffile import ELFFile  # auditwheel's own dependency

    tags = _manylinux_tags(wheel.name)
    if not tags or max(tags) > OLDEST_GLIBC:
        sys.exit(f"{wheel.name}: not tagged manylinux_2_28 or older")
    shown = subprocess.run(
        [sys.executable, "-m", "auditwheel", "show", str(wheel)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    ).stdout
    print(shown.strip())
    # auditwheel names the most compatible tag the wheel's symbols allow.
    allowed = _manylinux_tags(" ".join(shown.split()).split("platform tag:")[1].split(".")[0])
    if not allowed or allowed[0] > max(tags):
        sys.exit(f"{wheel.name}: auditwheel allows only {allowed}, the wheel claims {tags}")
    with zipfile.ZipFile(wheel) as z, tempfile.TemporaryDirectory() as tmp:
        (so,) = [n for n in z.namelist() if n.endswith(".so")]
        with open(z.extract(so, tmp), "rb") as f:
            debug = [s.name for s in ELFFile(f).iter_sections() if s.name.startswith(".debug")]
    if debug:
        sys.exit(f"{wheel.name}: {so} carries debug info {debug}")
    print(f"{wheel.name}: {wheel.stat().st_size / 1e3:.0f} kB, {so} without debug info\n")


# --- smoke ------------------------------------------------------------------


def _row_sum(args):
    a, i = args
    return float(a[i].sum())


def _make_big(i):
    import numpy as np

    return np.full(300_000, i, dtype="f8")  # 2.4 MB: above share_threshold, born shared


def _double_through_queues(q_in, q_out) -> None:
    q_out.put(q_in.get(timeout=TIMEOUT) * 2)


def _smoke_inner() -> None:
    import multiprocessing as mp
    from multiprocessing.reduction import ForkingPickler

    import numpy as np

    import memshare as ms

    site = Path(ms.__file__).resolve()
    assert Path(sys.prefix).resolve() in site.parents, f"memshare imported from {site}"
    a = ms.share(np.arange(4 * 250_000, dtype="f8").reshape(4, -1))
    assert ms.is_shared(a)
    size = len(ForkingPickler.dumps(a))
    assert size < 256, f"a shared array pickles to {size} bytes"
    want = [float(row.sum()) for row in np.asarray(a)]
    for method in START_METHODS:
        ctx = mp.get_context(method)
        with ms.Pool(2, context=ctx) as pool:
            got = pool.map_async(_row_sum, [(a, i) for i in range(4)]).get(TIMEOUT)
            assert got == want, (method, got, want)
            big = pool.map_async(_make_big, range(2)).get(TIMEOUT)
            assert all(ms.is_shared(b) and (b == i).all() for i, b in enumerate(big)), method
            del big
        q_in, q_out = ms.Queue(), ms.Queue()
        child = ctx.Process(target=_double_through_queues, args=(q_in, q_out))
        child.start()
        try:
            q_in.put(a)
            back = q_out.get(timeout=TIMEOUT)
            assert (back == np.asarray(a) * 2).all(), method
            del back
        finally:
            child.join(TIMEOUT)
            if child.is_alive():
                child.kill()
                child.join(TIMEOUT)
        assert child.exitcode == 0, (method, child.exitcode)
        print(f"  {method}: share, Pool map, Queue round trip ok")


def smoke() -> None:
    import importlib.metadata

    version = importlib.metadata.version("memshare")
    wheel = next(f for f in importlib.metadata.files("memshare") if f.name.startswith("_native."))
    print(f"Python {sys.version.split()[0]}: memshare {version}, {wheel.name}", flush=True)
    with tempfile.TemporaryDirectory(prefix="wheel-smoke-", dir="/dev/shm") as shm_dir:
        env = {**os.environ, "MEMSHARE_DIR": shm_dir}
        env.pop("MEMSHARE_ARENA", None)
        subprocess.run(
            [sys.executable, __file__, "smoke-inner"], env=env, timeout=4 * TIMEOUT, check=True
        )
        left = os.listdir(shm_dir)
        if left:
            sys.exit(f"shared memory left behind: {left}")
    print("  nothing left in shared memory")


def requires() -> None:
    """Prints the installed memshare's runtime requirements (not its extras')."""
    import importlib.metadata

    for req in importlib.metadata.requires("memshare") or []:
        if "extra ==" not in req:
            print(req)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("audit").add_argument("wheels", nargs="+", type=Path)
    sub.add_parser("requires")
    sub.add_parser("smoke")
    sub.add_parser("smoke-inner")
    args = parser.parse_args()
    if args.command == "audit":
        for wheel in args.wheels:
            audit(wheel)
    elif args.command == "requires":
        requires()
    elif args.command == "smoke":
        smoke()
    else:
        _smoke_inner()


if __name__ == "__main__":
    main()
