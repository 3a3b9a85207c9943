"""What the installed package says about itself: its version."""

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
