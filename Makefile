# The whole set-up on a fresh machine with Python 3.11+: `make demo`, `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Every package `make demo` and `make test` install, at the exact version the suite passed with
# (torch's CPU build included); `make lock` regenerates it from the newest releases.
LOCK := requirements.lock
# The oldest releases pyproject.toml admits, for `make test-lowest`.
LOWEST := requirements-lowest.txt
# Extra pip options, e.g. PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu" where
# torch's CPU wheel is not already on the machine.
PIP_ARGS ?=
# The torch a new lock takes: the CPU build.
LOCK_TORCH ?= torch==2.13.0+cpu

.PHONY: demo test test-all test-latest test-lowest lock bench bench-gpu lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# setuptools first, from the lock, so the editable install builds with it (no unlocked build env).
$(VENV)/.installed: pyproject.toml $(LOCK) | $(PY)
	$(PY) -m pip install -q $(PIP_ARGS) -c $(LOCK) setuptools
	$(PY) -m pip install -q $(PIP_ARGS) -c $(LOCK) --no-build-isolation -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(LOCK) $(VENV)/.installed
	$(PY) -m pip install -q $(PIP_ARGS) -c $(LOCK) --no-build-isolation -e ".[dev,peers]"
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

# The suite on a venv of its own: the newest releases (no lock), or the oldest pyproject.toml
# admits. Neither is the locked set, so the test that checks the venv against the lock is left out.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q $(PIP_ARGS) --upgrade setuptools
	.venv-latest/bin/python -m pip install -q $(PIP_ARGS) --upgrade -e ".[dev,peers]"
	.venv-latest/bin/python -m pip list | grep -iE "^(torch|transformers|peft) "
	.venv-latest/bin/python -m pytest -m "not slow and not lock" -q

test-lowest:
	rm -rf .venv-lowest
	$(PYTHON) -m venv .venv-lowest
	.venv-lowest/bin/python -m pip install -q $(PIP_ARGS) --upgrade setuptools
	.venv-lowest/bin/python -m pip install -q $(PIP_ARGS) -c $(LOWEST) -e ".[dev,peers]"
	.venv-lowest/bin/python -m pip list | grep -iE "^(torch|transformers|peft) "
	.venv-lowest/bin/python -m pytest -m "not slow and not lock" -q

# A fresh resolution of pyproject.toml (dev and peer extras included, torch = LOCK_TORCH), frozen.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q $(PIP_ARGS) --upgrade setuptools
	.venv-lock/bin/python -m pip install -q $(PIP_ARGS) "$(LOCK_TORCH)" -e ".[dev,peers]"
	{ echo "# The exact set \`make demo\` and \`make test\` install (pip constraints). Made by \`make lock\`"; \
	  echo "# on $$(date -u +%Y-%m-%d) with $$(.venv-lock/bin/python --version); do not edit by hand."; \
	  .venv-lock/bin/python -m pip freeze --all --exclude-editable | grep -vE "^pip=="; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .venv-lock

bench: $(VENV)/.installed-dev
	$(VENV)/bin/neurolattice lattice bench
	$(VENV)/bin/neurolattice lattice bench-train
	$(VENV)/bin/neurolattice lm bench
	$(VENV)/bin/neurolattice bem bench
	$(VENV)/bin/neurolattice neurograph bench

# On a GPU machine whose image already has torch, triton, transformers, peft and pytest (nothing is
# installed from a registry): the CUDA tests, then the lattice step per backend on the GPU. ~5 min.
GPU_PY ?= python3
bench-gpu:
	$(GPU_PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(GPU_PY) -m pytest -q -p no:cacheprovider tests/lattice/test_cuda.py
	$(GPU_PY) -m neurolattice.cli lattice bench --device cuda --sizes 30 50 100 --methods torch triton \
		--json results/lattice_bench_cuda.json

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) .venv-latest .venv-lowest .venv-lock results runs .pytest_cache
