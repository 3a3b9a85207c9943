# memshare — every target does its own setup; `make help` lists them.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP_DEPS := $(VENV)/.deps-stamp
STAMP_BUILD := $(VENV)/.build-stamp
STAMP_WHEEL_DEPS := $(VENV)/.wheel-deps-stamp
NATIVE_SOURCES := $(shell find crates -name '*.rs' -o -name Cargo.toml) Cargo.toml pyproject.toml
# Development tools are pinned in requirements/*.txt (see requirements/README.md):
# add a name to requirements/*.in, then `make lock`.
UV_VERSION := 0.13.9
LOCK := $(VENV)/bin/uv pip compile --quiet --universal --python-version 3.10 \
	--custom-compile-command 'make lock'
# make wheel: zig links against glibc 2.28's symbols (no Docker); the wheel
# profile is release without debug info. abi3 covers CPython >= 3.11.
WHEEL_BUILD := PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/maturin build --quiet \
	--profile wheel --zig --compatibility manylinux_2_28 --out dist
# The CPythons make test-wheels installs the wheels into (pyenv versions).
WHEEL_PYTHONS := 3.10.13 3.11.7 3.12.1 3.13.0
pyenv_python = "$$(pyenv prefix $(1) 2>/dev/null || echo $${PYENV_ROOT:-$$HOME/.pyenv}/versions/$(1))/bin/python"

# A second interpreter for CPython's own test suites (tests/conformance): the
# 3.13 install has test_concurrent_futures, which 3.11's lacks.
PY313 := $(firstword $(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3.13) $(shell command -v python3.13 2>/dev/null))
VENV313 := .venv-3.13
STAMP_313 := $(VENV313)/.build-stamp

.PHONY: help setup demo test test-rust test-python test-slow test-wheels wheel test-conformance setup-conformance lint fmt bench bench-compare lock \
	lock-upgrade clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP_DEPS): Makefile requirements/test.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet -r requirements/test.txt
	touch $@

$(STAMP_BUILD): $(STAMP_DEPS) $(NATIVE_SOURCES)
	$(VENV)/bin/maturin develop --release --quiet
	touch $@

setup: $(STAMP_BUILD)

$(STAMP_313): $(STAMP_DEPS) $(NATIVE_SOURCES)
	@test -n "$(PY313)" || { echo "CPython 3.13 is needed for the conformance suites (pyenv install 3.13)"; exit 1; }
	test -x $(VENV313)/bin/python || $(PY313) -m venv $(VENV313)
	$(VENV313)/bin/pip install --quiet -c requirements/test.txt maturin numpy cloudpickle
	VIRTUAL_ENV=$(abspath $(VENV313)) $(VENV313)/bin/maturin develop --release --quiet
	touch $@

setup-conformance: $(STAMP_313) ## memshare built into .venv-3.13 (for CPython 3.13's test suites)

$(STAMP_WHEEL_DEPS): $(STAMP_DEPS) requirements/wheel.txt
	$(PIP) install --quiet -r requirements/wheel.txt
	touch $@

demo: setup ## Set everything up in .venv and run the demo
	$(PY) examples/demo.py

test: test-rust test-python ## Set up and run every test (Rust and Python)

test-rust: ## Rust unit, integration and property tests
	cargo test --workspace

test-python: setup $(STAMP_313) ## pytest suite (real processes: fork, spawn, forkserver)
	cargo build --quiet --release -p memshare --example queue_peer
	$(PY) -m pytest -q

test-slow: setup ## The long tests: 600 more fault scenarios, soak (pytest -m slow)
	cargo build --quiet --release -p memshare --example queue_peer
	$(PY) -m pytest -q -m slow

test-conformance: setup $(STAMP_313) ## CPython's Pool/Queue/Executor tests: stock vs memshare, 3.11+3.13, 3 start methods
	$(PY) tests/conformance/matrix.py --python $(PY) --python $(VENV313)/bin/python \
		--suite mp --suite cf --start fork --start spawn --start forkserver

wheel: $(STAMP_WHEEL_DEPS) ## Build dist/: an abi3 wheel (CPython >= 3.11) and a cp310 one, audited
	rm -f dist/memshare-*.whl
	$(WHEEL_BUILD) --features abi3,pyo3/extension-module -i $(call pyenv_python,3.11.7)
	$(WHEEL_BUILD) -i $(call pyenv_python,3.10.13)
	$(PY) tests/wheels.py audit dist/memshare-*.whl

test-wheels: wheel ## Smoke-test the wheels in fresh venvs of CPython 3.10-3.13 (CI runs it)
	@set -e; for v in $(WHEEL_PYTHONS); do \
	  venv=target/wheel-venvs/$$v; rm -rf $$venv; \
	  $(call pyenv_python,$$v) -m venv $$venv; \
	  pip="$$venv/bin/pip --quiet --disable-pip-version-check"; \
	  $$pip install --no-index --find-links dist --no-deps memshare; \
	  $$venv/bin/python tests/wheels.py requires > $$venv/requires.txt; \
	  $$pip install -c requirements/test.txt -r $$venv/requires.txt; \
	  $$pip check; \
	  $$venv/bin/python tests/wheels.py smoke; \
	done

lint: $(STAMP_DEPS) ## clippy -D warnings, rustfmt --check, ruff
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy -p memshare-python --features abi3 -- -D warnings
	cargo fmt --all -- --check
	$(VENV)/bin/ruff check python tests benches examples
	$(VENV)/bin/ruff format --check python tests benches examples

fmt: $(STAMP_DEPS) ## Format Rust and Python sources
	cargo fmt --all
	$(VENV)/bin/ruff format python tests benches examples
	$(VENV)/bin/ruff check --fix python tests benches examples

bench: setup ## Run the benchmarks (prints tables, writes BENCHMARKS.md)
	$(PIP) install --quiet -r requirements/bench.txt
	$(PY) benches/run_all.py

bench-compare: setup ## Before/after figures: make bench-compare BEFORE=<python of another memshare install>
	@test -n "$(BEFORE)" || { echo "usage: make bench-compare BEFORE=/path/to/.venv/bin/python"; exit 2; }
	$(PY) benches/compare_versions.py --before $(BEFORE)

lock: ## Pin requirements/*.in into requirements/*.txt (keeps existing pins)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet uv==$(UV_VERSION)
	$(LOCK) $(LOCK_FLAGS) requirements/test.in -o requirements/test.txt
	$(LOCK) $(LOCK_FLAGS) requirements/bench.in -c requirements/test.txt -o requirements/bench.txt
	$(LOCK) $(LOCK_FLAGS) requirements/wheel.in -c requirements/test.txt -o requirements/wheel.txt

lock-upgrade: LOCK_FLAGS := --upgrade
lock-upgrade: lock ## Re-pin requirements/*.txt to the newest versions

clean: ## Remove build products and the virtualenv
	cargo clean
	rm -rf $(VENV) $(VENV313) dist
