# `make demo` and `make test` work on a fresh machine and give the same environment on every one:
# they create .venv if missing and install exactly the versions in requirements-lock.txt (torch
# 2.13.0 CPU build included; nothing else is resolved), then lopt_hf itself without dependencies,
# then check that the set is consistent. The pyproject ranges are for people who `pip install` the
# package; `make test-latest` checks that the newest versions those ranges admit still pass.
#
#   make test-all      the whole suite, slow tests included (what .ci/run runs)
#   make lock          regenerate requirements-lock.txt from a fresh venv (newest admitted versions)
#   make test-latest   fresh .venv-latest with the newest admitted versions, whole suite
#                      (run it before raising a range and before resolving any issue)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements-lock.txt
# The CPU build of torch: a bare `torch` (or a range admitting a newer release) pulls a multi-GB CUDA build.
TORCH_CPU := torch==2.13.0+cpu
EXTRAS := dev,data
LATEST_VENV := .venv-latest
LOCK_VENV := .venv-lock
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: install datasets demo test test-all test-latest lock bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# --no-deps everywhere: exactly the lock, nothing resolved; `pip check` then proves the set is consistent.
$(STAMP): $(PY) pyproject.toml $(LOCK)
	$(PY) -m pip install -q --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

# Fashion-MNIST (the Debian package dataset-fashion-mnist) for the fashion_mnist_* tasks; as root
# with apt-get it is installed, otherwise a note says how (those tasks and tests are skipped).
datasets:
	@if [ ! -d $(FASHION_MNIST_DIR) ] && [ -z "$$LOPT_HF_FASHION_MNIST_DIR" ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; } || \
	      echo "note: could not install dataset-fashion-mnist; Fashion-MNIST tasks will be skipped"; \
	  else \
	    echo "note: Fashion-MNIST tasks need 'sudo apt-get install dataset-fashion-mnist' (or LOPT_HF_FASHION_MNIST_DIR)"; \
	  fi; \
	fi

install: $(STAMP) datasets

demo: install
	$(PY) scripts/demo.py

# One pytest worker per CPU (pytest-xdist); a test file's tests stay on one worker (--dist loadfile), so
# module fixtures (the README's blocks, the tiny meta-training run) are built once.
# make test: everything but the tests marked slow (real subprocesses, multi-process runs, the README's
# blocks, the memory and long fuzz runs) — the loop to run while working, ≈ 2 min on 2 cores;
# make test-all: the whole suite, what CI (.ci/run) runs, ≈ 10–13 min on 2 cores.
PYTEST := -m pytest -q -n auto --dist loadfile tests

test: install
	$(PY) $(PYTEST) -m "not slow"

test-all: install
	$(PY) $(PYTEST)

# The newest versions the pyproject ranges admit, in a venv of their own (torch held at the CPU build).
test-latest: datasets
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q "$(TORCH_CPU)"
	echo "$(TORCH_CPU)" > $(LATEST_VENV)/torch-constraint.txt
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager \
	  -c $(LATEST_VENV)/torch-constraint.txt -e ".[$(EXTRAS)]"
	$(LATEST_VENV)/bin/python -m pip check
	grep -v -E '^(#|pip==|setuptools==|wheel==)' $(LOCK) > $(LATEST_VENV)/locked.txt
	$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable --exclude setuptools --exclude wheel \
	  > $(LATEST_VENV)/latest.txt
	diff $(LATEST_VENV)/locked.txt $(LATEST_VENV)/latest.txt \
	  && echo "newest admitted versions = $(LOCK)" \
	  || echo "(< locked, > newest admitted: releases since the lock; if the suite passes, make lock)"
	$(LATEST_VENV)/bin/python $(PYTEST)

# Regenerate the lock: a fresh venv, the CPU torch, then the package with its extras at the newest
# admitted versions, frozen (setuptools and wheel included: the editable install builds without isolation).
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q "$(TORCH_CPU)" setuptools wheel
	$(LOCK_VENV)/bin/python -m pip install -q ".[$(EXTRAS)]"
	$(LOCK_VENV)/bin/python -m pip check
	{ echo "# Exact versions for make demo / make test / .ci/run (Python 3.11, CPU). Regenerate: make lock"; \
	  echo "# torch is the CPU build; where pip cannot find it, set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu"; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude lopt_hf --exclude pip; } > $(LOCK)
	rm -rf $(LOCK_VENV)
	@echo "wrote $(LOCK) ($$(grep -c '==' $(LOCK)) packages)"

bench: install
	$(VENV)/bin/lopt-hf bench

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(LOCK_VENV) build *.egg-info
