# Two commands do all the set-up on a fresh machine:
#   make run   - create .venv, install spillway with its embedded node, serve on :8000
#   make test  - install what the tests need and run them
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --disable-pip-version-check -q
# llama-cpp-python is built from source for a fixed CPU tier, never -march=native (an AMX or
# AVX-512 build dies with SIGILL on other CPUs), and cached by its build flags, not by pip
# (~10 min the first time on 2 cores). See scripts/install_llama_cpp.py.
NODE   := $(BIN)/python scripts/install_llama_cpp.py

.PHONY: run test lint typecheck check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q --upgrade pip

$(VENV)/.installed-local: pyproject.toml scripts/install_llama_cpp.py | $(BIN)/python
	$(NODE)
	$(PIP) -e '.[local]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml scripts/install_llama_cpp.py | $(BIN)/python
	$(NODE)
	$(PIP) -e '.[local,postgres,dev]'
	touch $(VENV)/.installed-local $@

run: $(VENV)/.installed-local
	$(BIN)/spillway serve $(ARGS)

test: $(VENV)/.installed-dev
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests bench scripts training
	$(BIN)/ruff format --check src tests bench scripts training

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

check: lint typecheck test

# Performance benchmark (bench/README.md): installs nginx, wrk and LiteLLM's own venv if missing.
.PHONY: bench
bench: $(VENV)/.installed-dev
	bench/run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
