#!/usr/bin/env bash
# What users get: a fresh virtualenv with torch pinned (2.13.0, the CPU build) and the NEWEST accelerate and
# transformers that pip resolves within pyproject.toml's ranges, not constraints.txt's tested versions. Runs a
# focused subset there: the launcher's report after a signal, the Trainer callback (enable_jit_checkpoint
# included), a start-up mistake; then the wheel, installed over the editable package, runs the CLI and a 2-rank
# training from a scratch directory.
#
#   bash tests/newest_versions.sh                  (make test-newest; .ci/run runs it after make test)
#
# PY: the Python that makes the virtualenv (default python3). NEWEST_VENV=DIR: build the virtualenv there and
# keep it (reused when it exists: benchmarks/preemption_compare.py runs in it); by default a scratch one, removed.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ckptbus-newest.XXXXXX")
VENV=${NEWEST_VENV:-$WORK/venv}
trap 'rm -rf "$WORK"' EXIT

unset PYTHONPATH PYTHONHOME ACCELERATE_USE_CPU
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 ACCELERATE_DISABLE_RICH=1 PYTHONUNBUFFERED=1

step() { printf 'newest_versions: %s (%ds)\n' "$1" "$SECONDS"; }

pip_quietly() {
    if ! "$VENV/bin/pip" "$@" >"$WORK/pip.log" 2>&1; then
        tail -n 40 "$WORK/pip.log"
        echo "newest_versions: pip $1 failed" >&2
        exit 1
    fi
}

# The test tools at their tested versions (constraints.txt); everything the package needs left to pip.
TOOLS=(pytest pytest-timeout pytest-xdist hypothesis)
pins=()
for tool in "${TOOLS[@]}"; do pins+=("$(grep -i "^$tool==" "$REPO/constraints.txt")"); done

if [[ ! -x "$VENV/bin/python" ]]; then
    step "a fresh virtualenv with torch==2.13.0"
    "$PY" -m venv "$VENV"
    pip_quietly install --no-compile torch==2.13.0
fi

step "what pip resolves for the package (a dry run: it must keep torch 2.13.0)"
# pip's resolution report: every distribution it would install. A requirement that asks for another torch would
# pull a CUDA build of several GB: refused here before anything is installed.
pip_quietly install --dry-run --quiet --report "$WORK/report.json" torch==2.13.0 -e "$REPO" "${pins[@]}"
"$VENV/bin/python" - "$WORK/report.json" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
picked = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in report["install"]}
if "torch" in picked:
    sys.exit(f"newest_versions: pip would install torch {picked['torch']} over 2.13.0: refused")
EOF

step "install the package (editable) with the newest accelerate and transformers"
pip_quietly install --no-compile torch==2.13.0 -e "$REPO" "${pins[@]}"
"$VENV/bin/python" -c "
import accelerate, torch, transformers
print(f'newest_versions: torch {torch.__version__}, accelerate {accelerate.__version__}, transformers {transformers.__version__}')
"

step "the focused subset"
cd "$REPO"
# -p no:cacheprovider: nothing written into the checkout. -n 0: one process (CI runs this after the suite). Two
# real 2-rank launches here (the launcher's report after Ctrl+C; SIGTERM with enable_jit_checkpoint and ckptbus on),
# one more for the wheel below; the Trainer's other tests in process. tests/test_signals.py's and
# tests/test_hf_trainer.py's Ctrl+C launches are left out: they expect the launcher status of accelerate 1.15.
"$VENV/bin/python" -m pytest -p no:cacheprovider -n 0 -q \
    tests/test_launcher_report.py \
    tests/test_jit_checkpoint.py \
    tests/test_startup_mistakes.py::test_a_config_typo
"$VENV/bin/python" -m pytest -p no:cacheprovider -n 0 -q -m "not slow" tests/test_hf_trainer.py

step "the wheel, installed over the editable package: the CLI and a 2-rank training from a scratch directory"
mkdir "$WORK/src" "$WORK/run"
(cd "$REPO" && tar --exclude=__pycache__ -cf - pyproject.toml setup.py README.md ckptbus plugins) |
    tar -xf - -C "$WORK/src"
pip_quietly wheel --no-deps --wheel-dir "$WORK/dist" "$WORK/src"
wheels=("$WORK"/dist/ckptbus-*.whl)
pip_quietly install --no-compile --no-deps --force-reinstall "${wheels[0]}"
cp "$REPO/train.py" "$WORK/run/"
cd "$WORK/run"
cat >run.yaml <<'EOF'
output_dir: out
max_steps: 6
save_steps: 3
dataset_size: 64
micro_batch_size: 4
sequence_len: 16
model: {n_layer: 1, n_head: 2, n_embd: 32, vocab_size: 32}
EOF
"$VENV/bin/ckptbus" --version
port=$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$VENV/bin/accelerate" launch --multi_gpu --num_processes 2 --main_process_port "$port" train.py --config run.yaml \
    >train.log 2>&1 || { tail -n 40 train.log; echo "newest_versions: training from the wheel failed" >&2; exit 1; }
"$VENV/bin/ckptbus" verify --output-dir out >/dev/null
"$VENV/bin/ckptbus" list --output-dir out
if [[ -n "${NEWEST_VENV:-}" ]]; then
    # A kept virtualenv goes back to the editable package, for the next run of this script and the benchmark.
    pip_quietly install --no-compile --no-deps -e "$REPO"
fi
step "done"
