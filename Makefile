# Both targets do all set-up themselves in a local virtualenv. The pinned CPU torch is installed first so that
# the `hf` extra's torch requirement is already met and pip does not pull the CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: setup test demo parity-demo bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[hf,test,train]"
	touch $@

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

# The main job: the embedded demo model compresses built-in contexts with KVzip at ratio 0.3 and answers them.
demo: setup
	$(PY) -m kvzip_jax.kvzip_demo

# Loading, generation and transformers parity on a freshly built tiny checkpoint.
parity-demo: setup
	$(PY) -m kvzip_jax.demo

bench: setup
	$(PY) scripts/bench_generate.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
