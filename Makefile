# Set-up, the main job, the tests. See README.md.
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
NPROC ?= 2

.PHONY: setup train train-1 test test-quick lint bench clean

setup:  ## create .venv with the CPU build of torch and everything else
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'

train:  ## the main job: 2 ranks over gloo, tiny GPT-2, on-demand checkpoints on
	$(BIN)/accelerate launch --multi_gpu --num_processes $(NPROC) train.py --config configs/tiny.yaml

train-1:  ## the same with one process
	$(BIN)/python train.py --config configs/tiny.yaml

test:  ## the whole test suite (what CI runs)
	$(BIN)/python -m pytest -n 2 --dist loadgroup

test-quick:  ## unit tests only, no training processes
	$(BIN)/python -m pytest -m "not slow" -n 2

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench:  ## every benchmark; results under benchmarks/results/
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf outputs .pytest_cache .mypy_cache .ruff_cache
