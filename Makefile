# gdml: `make demo` and `make test` set everything up (a virtual environment in .venv) and run.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo demo-local lint test test-all test-fast gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "gdml needs Python 3.11 (found " + sys.version.split()[0] + ")")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --progress-bar off -e '.[cpu,tune,dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/gdml demo

demo-local: setup
	$(BIN)/gdml demo --local

lint: setup
	$(BIN)/ruff check .

# The two tiers: `test` (unit tests + one end-to-end pass through each real component, under 10 minutes on 2
# cores) and `test-all` (everything: fault injection, the Jobs API, outages, benchmark smoke runs; what CI runs).
test: lint
	$(BIN)/python -m pytest -m "not full"

test-all: lint
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not full"

gpu-check: setup
	$(BIN)/python benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) data ray_results mlruns mlflow.db .pytest_cache
