# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both bootstrap uv (if missing) and install the locked environment into .venv.
SHELL := /bin/bash
UV ?= $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
PY := .venv/bin/python
SHARED ?= $(abspath ../shared)
export CXR_SHARED ?= $(SHARED)

.PHONY: help setup demo test test-fast bench clean lint

help:
	@echo "make demo   - install, train a tiny model on the bundled samples, then screen them (local Ray)"
	@echo "make test   - install and run the test suite (needs ../shared)"
	@echo "make bench  - run the benchmarks in bench/ (long; figures go to BENCHMARKS.md)"

$(UV):
	@echo "uv not found: installing it from the package registry"
	@python3 -m pip install --quiet --user uv || python3 -m pip install --quiet uv
	@test -x "$(UV)" || { mkdir -p $(dir $(UV)); ln -sf "$$(command -v uv)" "$(UV)"; }

# --compile-bytecode: where PYTHONDONTWRITEBYTECODE is set (these machines set it), a module without
# a .pyc is compiled again by every process that imports it, and a screening job starts ~15 Ray
# processes: precompiling saves ~8 CPU-s per local job (BENCHMARKS.md). Our own packages too.
.venv/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --python 3.11 --compile-bytecode
	$(PY) -m compileall -q cxr jobs serve > /dev/null
	@touch $@

setup: .venv/.synced

demo: setup
	$(PY) -m jobs.demo

test: setup
	@test -d "$(CXR_SHARED)/data/chest_xray" || { echo "error: shared data not found at $(CXR_SHARED)/data/chest_xray (set CXR_SHARED=/path/to/shared, the folder holding data/chest_xray)"; exit 2; }
	$(PY) -m pytest -q --timeout=900 tests

bench: setup
	$(PY) bench/train_throughput.py
	$(PY) bench/screen_throughput.py
	$(PY) bench/serve_load.py

clean:
	rm -rf .venv runs screens reports demo-out .pytest_cache
