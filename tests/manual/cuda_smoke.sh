#!/usr/bin/env bash
# A manual check of the CUDA path on a machine with one GPU (CI has none):
# train.py picks the GPU, a trigger file and a scheduled save write full
# checkpoints, a resume from `latest` continues at the next step, and a
# weights checkpoint loads with from_pretrained.
set -euo pipefail
PY=${PY:-python3}
OUT=$(mktemp -d)/run
ASYNC=${ASYNC:-false}
cat > /tmp/cuda_smoke.yaml <<YAML
output_dir: $OUT
max_steps: 60
save_steps: 25
dynamic_checkpoint: {enabled: true, check_interval: 5, async_save: $ASYNC}
YAML
echo "async_save: $ASYNC"
$PY - <<'PYCODE'
import torch; print("cuda available:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PYCODE
( for _ in $(seq 600); do
    if [ -f "$OUT/metrics.jsonl" ] && [ "$(wc -l < "$OUT/metrics.jsonl")" -ge 10 ]; then touch "$OUT/axolotl_checkpoint.save"; break; fi
    sleep 0.1
  done ) &
$PY train.py --config /tmp/cuda_smoke.yaml 2>&1 | grep -E "ckptbus|ended|Error|error" || true
ls "$OUT"
$PY train.py --config /tmp/cuda_smoke.yaml --max-steps 70 --resume-from-checkpoint latest 2>&1 | grep -E "resumed|ended|Error" || true
head -1 <(tail -n 10 "$OUT/metrics.jsonl")
$PY - "$OUT" <<'PYCODE'
import sys
from ckptbus import list_checkpoints
for c in list_checkpoints(sys.argv[1]):
    m = c.manifest
    print("checkpoint", c.step, m.kind, m.reason, "stall", m.stall_seconds, "write", m.write_seconds)
PYCODE
$PY - "$OUT" <<'PYCODE'
import sys, torch
from accelerate import Accelerator
from ckptbus.plugins import DynamicCheckpoint
from ckptbus import list_checkpoints
from transformers import GPT2Config, GPT2LMHeadModel
out = sys.argv[1]
acc = Accelerator()
model = acc.prepare(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)))
with DynamicCheckpoint(acc, out + "-api") as ckpt:
    ckpt.request("weights", label="cuda smoke")
    for step in range(1, 101):
        ckpt.step(step)
info = list_checkpoints(out + "-api")[-1]
print("api checkpoint:", info.path, info.manifest.kind, info.manifest.labels, "device", acc.device)
m = GPT2LMHeadModel.from_pretrained(str(info.path))
print("from_pretrained ok:", sum(p.numel() for p in m.parameters()))
PYCODE
