# The whole set-up on a fresh machine with Python 3.11+: `make demo`, `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch; override (e.g. TORCH=torch) for a CUDA machine.
TORCH ?= torch==2.13.0

.PHONY: demo test test-all bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev,peers]"
	touch $@

# Train the lattice on scikit-learn's digits, print held-out accuracy beside the baselines, plot.
demo: $(VENV)/.installed
	rm -rf runs/demo
	$(VENV)/bin/neurolattice lattice train --out runs/demo --json runs/demo/result.json
	$(VENV)/bin/neurolattice lattice show runs/demo

test: $(VENV)/.installed-dev
	$(PY) -m pytest -m "not slow" -q

test-all: $(VENV)/.installed-dev
	$(PY) -m pytest -q

bench: $(VENV)/.installed-dev
	$(VENV)/bin/neurolattice lattice bench
	$(VENV)/bin/neurolattice lattice bench-train
	$(VENV)/bin/neurolattice lm bench
	$(VENV)/bin/neurolattice bem bench
	$(VENV)/bin/neurolattice neurograph bench

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) results runs .pytest_cache
