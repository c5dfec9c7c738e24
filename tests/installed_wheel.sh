#!/usr/bin/env bash
# Test what users install: build the wheel, install it into a fresh virtualenv,
# and run the CLI and a short 2-rank training from the installed package.
#
# Everything runs from a scratch directory that holds only train.py and its
# config, so the source tree cannot be imported by accident: a module that
# the wheel lacks fails here, not on a user's machine.
#
#   bash tests/installed_wheel.sh        (make test-wheel; make test runs it after the suite)
#
# PY: the Python that makes the virtualenv (default python3). KEEP=1 keeps the
# scratch directory for a look afterwards.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ckptbus-wheel.XXXXXX")
VENV=$WORK/venv

cleanup() {
    if [[ "${KEEP:-}" == 1 ]]; then echo "installed_wheel: kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# A clean environment for every command below: nothing points back at the source tree.
unset PYTHONPATH PYTHONHOME ACCELERATE_USE_CPU
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 ACCELERATE_DISABLE_RICH=1 PYTHONUNBUFFERED=1

step() { printf 'installed_wheel: %s (%ds)\n' "$1" "$SECONDS"; }

# pip's output goes to a log, shown only when pip fails (it warns about every index it is configured with).
pip_quietly() {
    if ! "$VENV/bin/pip" "$@" >"$WORK/pip.log" 2>&1; then
        tail -n 40 "$WORK/pip.log"
        echo "installed_wheel: pip $1 failed" >&2
        exit 1
    fi
}

step "build the wheel"
# From a copy of what the build reads: setuptools writes build/ and *.egg-info
# into the tree it builds, and the checkout is not ours to write into.
mkdir "$WORK/src"
(cd "$REPO" && tar --exclude=__pycache__ -cf - pyproject.toml setup.py README.md ckptbus plugins) |
    tar -xf - -C "$WORK/src"
"$PY" -m venv "$VENV"
pip_quietly wheel --no-deps --wheel-dir "$WORK/dist" "$WORK/src"
wheels=("$WORK"/dist/ckptbus-*.whl)

step "install it into a fresh virtualenv"
# torch pinned (the CPU build on local disk; unpinned would pull a CUDA build of several GB).
# --no-compile: byte-compiling all of torch and transformers doubled this step; the
# run below compiles only what it imports.
pip_quietly install --no-compile -c "$REPO/constraints.txt" torch==2.13.0 "${wheels[0]}"

RUN=$WORK/run
mkdir "$RUN"
cp "$REPO/train.py" "$RUN/"
cd "$RUN"

step "every module of the source trees is installed, and imported from site-packages"
"$VENV/bin/python" - "$WORK/src" <<'EOF'
import sys
import sysconfig
from pathlib import Path

import ckptbus
import ckptbus.plugins

src = Path(sys.argv[1])
installed = Path(ckptbus.__file__).parent
site = Path(sysconfig.get_paths()["purelib"])
assert installed == site / "ckptbus", f"ckptbus imported from {installed}, not from {site}"
assert Path(ckptbus.plugins.__file__).parent == installed / "plugins", ckptbus.plugins.__file__
wanted = {f"ckptbus/{p.relative_to(src / 'ckptbus')}" for p in (src / "ckptbus").rglob("*.py")}
wanted |= {f"ckptbus/plugins/{p.relative_to(src / 'plugins')}" for p in (src / "plugins").rglob("*.py")}
missing = sorted(p for p in wanted if not (site / p).is_file())
assert not missing, f"the wheel lacks {missing}"
print(f"installed_wheel: {len(wanted)} modules under {installed}")
EOF

step "ckptbus --help"
"$VENV/bin/ckptbus" --help >"$WORK/help.txt"
grep -q "^usage: ckptbus" "$WORK/help.txt"

step "a short 2-rank training with the installed package"
cat >"$RUN/run.yaml" <<'EOF'
output_dir: out
max_steps: 20
save_steps: 10
micro_batch_size: 4
sequence_len: 16
dataset_size: 256
model: {n_layer: 1, n_head: 2, n_embd: 32, vocab_size: 32}
dynamic_checkpoint: {enabled: true, check_interval: 5}
EOF
port=$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# The launcher forwards SIGTERM to its ranks; -k ends anything still there 30 s later.
if ! timeout -k 30 300 "$VENV/bin/accelerate" launch --multi_gpu --num_processes 2 --main_process_port "$port" \
    train.py --config run.yaml >"$WORK/train.log" 2>&1; then
    tail -n 40 "$WORK/train.log"
    echo "installed_wheel: the training run failed" >&2
    exit 1
fi

step "ckptbus list --output-dir out"
"$VENV/bin/ckptbus" list --output-dir out | tee "$WORK/list.txt"
grep -q "checkpoint-20" "$WORK/list.txt"

step "passed"
