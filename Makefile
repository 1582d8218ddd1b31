# The two commands: `make demo` (set up + end-to-end demo) and `make test` (set up + the test suite).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# -m "not integration" for the seconds-fast unit tests only
PYTEST_ARGS ?=

.PHONY: setup demo test test-unit clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml docker/constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11+); run: make PYTHON=python3 ..."; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# CPU wheel first and pinned: an unpinned torch would pull the multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c docker/constraints.txt -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/po-ray train --config demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

clean:
	rm -rf po_ray_runs .pytest_cache
