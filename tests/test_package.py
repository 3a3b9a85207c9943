"""What the package says about itself (its version) and how it is built (its locks)."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import memshare as ms
from memshare import _native

ROOT = Path(__file__).resolve().parent.parent


def cargo_version() -> str:
    text = (ROOT / "Cargo.toml").read_text()
    section = text.split("[workspace.package]", 1)[1].split("\n[", 1)[0]
    return re.search(r'^version\s*=\s*"([^"]+)"', section, re.M).group(1)


def test_version_is_cargos():
    assert ms.__version__ == _native.__version__ == cargo_version()


def test_version_matches_the_installed_metadata():
    # maturin writes Cargo's version into the wheel's metadata (dynamic version).
    assert importlib.metadata.version("memshare") == ms.__version__


def test_version_is_pep440():
    assert re.fullmatch(r"\d+\.\d+\.\d+([abc]|rc)?\d*(\.dev\d+)?", ms.__version__)


def _names(path: Path) -> set[str]:
    """Normalised project names of a requirements file (comments, extras, pins dropped)."""
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line).group(0)
            names.add(re.sub(r"[-_.]+", "-", name).lower())
    return names


def test_every_requirement_is_pinned_in_its_lock_file():
    # Someone who adds a name to requirements/*.in must also run `make lock`.
    for source in sorted((ROOT / "requirements").glob("*.in")):
        lock = source.with_suffix(".txt")
        pinned = {line.split("==")[0] for line in lock.read_text().splitlines() if "==" in line}
        missing = _names(source) - _names(lock)
        assert not missing, f"{sorted(missing)} in {source.name} but not in {lock.name}: make lock"
        assert all(
            "==" in line for line in lock.read_text().splitlines() if line and line[0].isalnum()
        ), f"{lock.name} has an unpinned line"
        assert pinned, lock
