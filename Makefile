# The commands of README.md. `make train` and `make test` set up .venv first
# when it is missing or pyproject.toml changed, so on a fresh machine each
# works on its own.
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
NPROC ?= 2
CONFIG ?= configs/tiny.yaml
STAMP = $(VENV)/.installed
AXOLOTL_VENV ?= .venv-axolotl
AXOLOTL_STAMP = $(AXOLOTL_VENV)/.installed

.PHONY: setup train train-1 demo test test-wheel test-newest test-quick test-axolotl lint bench clean

$(STAMP): pyproject.toml setup.py constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch, pinned: it installs from local disk; an unpinned
	# torch would download a CUDA build of several GB.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	# DeepSpeed, for its tests on CPU ranks: a source package whose build imports torch, so it is built against the
	# torch above without build isolation (isolation would fetch another torch, a CUDA build of several GB).
	$(BIN)/pip install --quiet -c constraints.txt --no-build-isolation setuptools wheel deepspeed==0.19.8
	touch $(STAMP)

setup: $(STAMP)  ## create .venv with the CPU build of torch and everything else

train: $(STAMP)  ## the main job: 2 ranks over gloo, tiny GPT-2, on-demand checkpoints on
	$(BIN)/accelerate launch --multi_gpu --num_processes $(NPROC) train.py --config $(CONFIG)

train-1: $(STAMP)  ## the same with one process
	$(BIN)/python train.py --config $(CONFIG)

# make demo starts afresh in outputs/demo, but never under a demo that runs there: that one holds
# outputs/demo/ckptbus.lock (ckptbus/_lock.py), and deleting its directory would end it without a checkpoint.
# The folder is emptied while this holds the lock itself, so a demo starting meanwhile is refused, not emptied.
define FRESH_DEMO_DIR
import os, shutil, sys
from ckptbus import SetupError
from ckptbus._lock import acquire, holder_of
from ckptbus._names import LOCK_NAME
out = "outputs/demo"
if os.path.lexists(out):
    try:
        lock = acquire(out)
    except (SetupError, OSError) as exc:
        holder = holder_of(out)
        who = f"pid {holder.pid} on {holder.host}, since {holder.started}" if holder else str(exc)
        sys.exit(f"make demo: a demo is running in {out} ({who}); it is left as it is. Stop it first "
                 "(Ctrl+C in its terminal), or try its triggers from this terminal")
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if name == LOCK_NAME:
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    lock.release()
endef
export FRESH_DEMO_DIR

demo: $(STAMP)  ## train until Ctrl+C and print the commands to try from another terminal; starts afresh in outputs/demo (refused while a demo runs there)
	@$(BIN)/python -c "$$FRESH_DEMO_DIR"
	$(BIN)/accelerate launch --multi_gpu --num_processes $(NPROC) train.py --config configs/demo.yaml --show-commands

test: $(STAMP)  ## the whole test suite, then the installed-wheel check (what CI runs)
	$(BIN)/python -m pytest -n 2
	PY=$(PY) bash tests/installed_wheel.sh

# axolotl 0.19 (Python 3.11) and its requirements: about 4 GB, 20-25 minutes the first time. torch is pinned in
# every install: a requirement asking for torch would otherwise pull a CUDA build of several GB. No constraints.txt
# here: axolotl 0.19 needs older accelerate and transformers than the main set-up pins.
$(AXOLOTL_STAMP): pyproject.toml setup.py
	$(PY) -m venv $(AXOLOTL_VENV)
	$(AXOLOTL_VENV)/bin/pip install --quiet --upgrade pip
	$(AXOLOTL_VENV)/bin/pip install --quiet torch==2.13.0
	$(AXOLOTL_VENV)/bin/pip install --quiet torch==2.13.0 axolotl==0.19.0
	$(AXOLOTL_VENV)/bin/pip install --quiet torch==2.13.0 pytest==9.2.0 pytest-timeout==2.4.0 pytest-xdist==3.8.0 -e '.[axolotl]'
	touch $(AXOLOTL_STAMP)

test-axolotl: $(AXOLOTL_STAMP)  ## the axolotl plugin with real axolotl, 1 and 2 CPU ranks (sets up .venv-axolotl first)
	$(AXOLOTL_VENV)/bin/python -m pytest tests/test_axolotl.py -n 0

test-wheel:  ## build the wheel, install it into a fresh virtualenv, run the CLI and a 2-rank training from it
	PY=$(PY) bash tests/installed_wheel.sh

# A virtualenv of its own (about a minute to set up, then 2-4 minutes of tests on 2 cores): torch==2.13.0 pinned, the
# newest accelerate and transformers within pyproject.toml's ranges, what `pip install` gives users today.
test-newest:  ## a focused subset against the newest accelerate and transformers pip resolves (tests/newest_versions.sh)
	PY=$(PY) bash tests/newest_versions.sh

test-quick: $(STAMP)  ## no training processes: unit tests only
	$(BIN)/python -m pytest -m "not slow" -n 2

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)  ## every benchmark; results under benchmarks/results/
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf outputs .pytest_cache .mypy_cache .ruff_cache
