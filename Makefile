# The commands of README.md. `make train` and `make test` set up .venv first
# when it is missing or pyproject.toml changed, so on a fresh machine each
# works on its own.
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
NPROC ?= 2
CONFIG ?= configs/tiny.yaml
STAMP = $(VENV)/.installed

.PHONY: setup train train-1 test test-quick lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch, pinned: it installs from local disk; an unpinned
	# torch would download a CUDA build of several GB.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)  ## create .venv with the CPU build of torch and everything else

train: $(STAMP)  ## the main job: 2 ranks over gloo, tiny GPT-2, on-demand checkpoints on
	$(BIN)/accelerate launch --multi_gpu --num_processes $(NPROC) train.py --config $(CONFIG)

train-1: $(STAMP)  ## the same with one process
	$(BIN)/python train.py --config $(CONFIG)

test: $(STAMP)  ## the whole test suite (what CI runs)
	$(BIN)/python -m pytest -n 2

test-quick: $(STAMP)  ## no training processes: unit tests only
	$(BIN)/python -m pytest -m "not slow" -n 2

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)  ## every benchmark; results under benchmarks/results/
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf outputs .pytest_cache .mypy_cache .ruff_cache
