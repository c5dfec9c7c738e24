#!/usr/bin/env bash
# Save-stall and write-speed figures on a machine with GPUs (CI has none): the same arms as on CPU
# (benchmarks/save_stall.py), one rank per GPU, NCCL. Run from the repository root after `make setup`
# (a CUDA build of torch is needed there: `pip install torch` for the machine's CUDA).
#
#   NPROC=8 bash tests/manual/gpu_save_bench.sh        # 8 ranks; default: every visible GPU
#
# Reports the slowest rank's stall of an asynchronous save against save_state, the synchronous save with N
# writers against one writer, the cost of digests, and sync throughput against dd, all side by side in one
# run; results in benchmarks/results/gpu/save_stall.json and .png. The forked writer (async_writer: process)
# reads CPU tensors only, so on GPUs its arm falls back to the thread (logged): compare the thread's figures.
set -euo pipefail
cd "$(dirname "$0")/../.."
NPROC=${NPROC:-$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null || echo 1)}
ROUNDS=${ROUNDS:-5}
mkdir -p benchmarks/results/gpu
multi=()
[ "$NPROC" -gt 1 ] && multi=(--multi_gpu)
.venv/bin/accelerate launch "${multi[@]}" --num_processes "$NPROC" --main_process_port "${PORT:-29611}" \
    -m benchmarks.save_stall --rounds "$ROUNDS" --out benchmarks/results/gpu/save_stall.json
