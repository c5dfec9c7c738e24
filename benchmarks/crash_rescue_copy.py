"""The per-step cost of the copy each rank keeps for a rescue, measured under the launcher (for crash_rescue.py).

    accelerate launch --multi_gpu --num_processes 2 -m benchmarks.crash_rescue_copy --out FILE [options]

The GPT-2 of benchmarks/save_stall.py trains in the same processes under
the DynamicCheckpoints of two arms, stepped in alternating blocks (the arm
that goes first alternates each round, as benchmarks/overhead.py does; each
arm has two, created full, none, none, full and taking turns, because the
one created first in a process was measured to cost more per step):

- ``on_error full``: the default; at every step boundary the rank copies its
  RNG states into the shared file (``AccelerateSink.rank_state()`` then
  ``RankMirror.record()``, in ``Runtime.step_boundary``);
- ``on_error none``: the same run with that copy skipped.

Timed: every ``ckpt.step()`` call of each arm, the training step itself, and
the copy alone (``rank_state()`` + ``record()``): ``--repeats`` times in a row
at the last step boundary, and once right after each training step of the
``on_error none`` arm, where the caches are as a step boundary finds them.
The main process writes the figures to ``--out`` as JSON;
crash_rescue.py reads them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from ckptbus.plugins import DynamicCheckpoint, release

from benchmarks.overhead import bootstrap_interval
from benchmarks.save_stall import Training, max_over_ranks
from ckptbus import CheckpointConfig
from ckptbus._config import build

ARMS = ("on_error full", "on_error none")


def ckpt_config(output_dir: Path, on_error: str) -> CheckpointConfig:
    """ckptbus as train.py users run it (signals at their defaults, so the ranks vote at every step), no socket,
    no event log; ``on_error`` as the arm says."""
    block = {"enabled": True, "event_log": False, "socket": {"enabled": False}, "on_error": on_error}
    return build(CheckpointConfig, {"output_dir": str(output_dir), "dynamic_checkpoint": block})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="where the main process writes the figures (JSON)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--block", type=int, default=3, help="optimizer steps per arm per round")
    parser.add_argument("--repeats", type=int, default=2000, help="times the copy alone is timed")
    parser.add_argument("--n-layer", type=int, default=6)
    parser.add_argument("--n-embd", type=int, default=768)
    args = parser.parse_args()

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    training = Training(accelerator, args.n_layer, args.n_embd)
    for _ in range(3):  # warm-up, and AdamW's state exists from here on
        training.step()
    root = [tempfile.mkdtemp(prefix="ckptbus-bench-rescue-") if accelerator.is_main_process else ""]
    torch.distributed.broadcast_object_list(root, src=0)
    # Two DynamicCheckpoints an arm, created full, none, none, full: where one is created in the process changes
    # what its step() costs (measured: the first one created costs more), so each arm has one early, one late.
    created = [
        (arm, ckpt_config(Path(root[0]) / f"{arm.split()[1]}{i}", arm.split()[1]))
        for i, arm in ((0, ARMS[0]), (0, ARMS[1]), (1, ARMS[1]), (1, ARMS[0]))
    ]
    ckpts: dict[str, list[DynamicCheckpoint]] = {arm: [] for arm in ARMS}
    for arm, config in created:
        ckpts[arm].append(DynamicCheckpoint(accelerator, config))
    full = ckpts["on_error full"][0]
    mirror = full._runtime._mirror
    assert mirror is not None, "no shared file between the ranks: the copy is not kept (one machine needed)"

    inside: dict[str, list[float]] = {arm: [] for arm in ARMS}  # per round: mean seconds of one ckpt.step()
    step_seconds: list[float] = []  # per block: mean seconds of one training step, ckpt.step() left out
    at_boundary: list[float] = []  # the copy alone, right after a training step (caches as a boundary finds them)
    steps = dict.fromkeys(ARMS, 0)
    for round_index in range(args.rounds):
        for arm in ARMS if round_index % 2 == 0 else ARMS[::-1]:
            ckpt, in_step, training_time = ckpts[arm][round_index // 2 % 2], 0.0, 0.0
            accelerator.wait_for_everyone()
            for _ in range(args.block):
                started = time.perf_counter()
                training.step()
                entered = time.perf_counter()
                if arm == "on_error none":  # (the full arm's last step recorded again: changes nothing)
                    mirror.record(steps["on_error full"], full.sink.rank_state())
                    at_boundary.append(time.perf_counter() - entered)
                    entered = time.perf_counter()
                steps[arm] += 1
                ckpt.step(steps[arm])
                in_step += time.perf_counter() - entered
                training_time += entered - started
            inside[arm].append(in_step / args.block)
            step_seconds.append(training_time / args.block)

    # The copy alone, at the last step boundary of the full arm (recording that step again changes nothing).
    at = steps["on_error full"]
    state_seconds, record_seconds = [], []
    data = b""
    for _ in range(args.repeats):
        started = time.perf_counter()
        data = full.sink.rank_state()
        encoded = time.perf_counter()
        mirror.record(at, data)
        record_seconds.append(time.perf_counter() - encoded)
        state_seconds.append(encoded - started)
    copy_median = statistics.median(s + r for s, r in zip(state_seconds, record_seconds, strict=True))
    copy_max_over_ranks = max_over_ranks(accelerator, copy_median)

    for pair in ckpts.values():
        for ckpt in pair:
            ckpt.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(root[0], ignore_errors=True)
        differences = [f - n for f, n in zip(inside["on_error full"], inside["on_error none"], strict=True)]
        step = statistics.median(step_seconds)
        result = {
            "parameters": training.parameters,
            "rounds": args.rounds,
            "steps_per_block": args.block,
            "rank_state_bytes": len(data),
            "median_step_seconds": step,
            "copy_microseconds": {
                "rank_state": statistics.median(state_seconds) * 1e6,
                "record": statistics.median(record_seconds) * 1e6,
                "both": copy_median * 1e6,
                "both_max_over_ranks": copy_max_over_ranks * 1e6,
            },
            "copy_over_step": copy_max_over_ranks / step,
            "copy_at_boundary_microseconds": statistics.median(at_boundary) * 1e6,
            "copy_at_boundary_over_step": statistics.median(at_boundary) / step,
            "step_call_microseconds": {arm: statistics.median(v) * 1e6 for arm, v in inside.items()},
            "step_call_full_minus_none_microseconds": statistics.median(differences) * 1e6,
            "step_call_full_minus_none_interval_95": [x * 1e6 for x in bootstrap_interval(differences)],
            "step_call_full_minus_none_over_step": statistics.median(differences) / step,
        }
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    training.prepared.clear()  # (the DDP model goes before the process group: see release())
    del full, mirror
    ckpts.clear()
    release(accelerator)


if __name__ == "__main__":
    main()
