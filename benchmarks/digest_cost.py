"""What content digests add to a synchronous full save, side by side in one run, many rounds.

Run under the launcher, 2 ranks over gloo, from the repository root:

    accelerate launch --multi_gpu --num_processes 2 -m benchmarks.digest_cost --rounds 41 [--smoke]

The model of benchmarks/save_stall.py (a GPT-2 of about 42M parameters with
AdamW's state, about 513 MB) is saved synchronously by two arms, in
alternating order (ABBA) so that drift on a shared machine hits both alike:

- ``digests``: a ckptbus full save as it runs by default: the files spread
  over the ranks, each hashed (XXH3-128) as it is written, by a helper thread
  that goes on through the fsync;
- ``no digests``: the same save with no hashing at all.

Figures (round 0, which warms the page cache, left out):

- ``digests_cost_over_sync``: the median over rounds of the per-round ratio
  digests / no digests, minus 1 (target <= 0.02), with its 95% bootstrap
  interval: on these machines a single save varies by tens of percent, so
  the interval says what the run can resolve;
- ``hash_wait_over_sync``: the time the writing thread waited for the hash
  (hashing small writes inline, waiting for the helper at the end of a large
  write that cannot be hashed later, and at ``close`` after the fsync),
  slowest rank, over the digest-free save's time. It is measured inside the
  save, so machine noise hardly touches it: it is what the digests cost when
  a core is free for the helper. On a machine with no free core (2 ranks on
  2 cores here) the helper also takes CPU time from the writes, which only
  the first figure sees.

Both arms set ``DynamicCheckpoint.sink.digests``, and the wait is the
sink's ``hash_wait_seconds``. Results go to
benchmarks/results/digest_cost.json.

``--smoke``: a GPT-2 of one block, 2 rounds: both arms end to end in
seconds, the result checked and written to a temporary directory
(benchmarks/output.py).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from ckptbus.plugins import DynamicCheckpoint, release

from benchmarks.output import write_result
from benchmarks.overhead import bootstrap_interval
from benchmarks.save_stall import Training, add_arm, arguments, ckpt_config, max_over_ranks, parse
from ckptbus import SaveCompleted, list_checkpoints
from ckptbus._layout import withdraw

ARMS = ("digests", "no digests")
REQUIRED = (
    *(f"median_seconds_after_round_0.{arm}" for arm in ARMS),
    "checkpoint_bytes",
    "digests_cost_over_sync",
    "digests_cost_interval_95",
    "hash_wait_over_sync",
    "hash_wait_median_seconds",
)


def main() -> None:
    args = parse(arguments("digest_cost", rounds=41))

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    main_process = accelerator.is_main_process
    training = Training(accelerator, args.n_layer, args.n_embd)
    for _ in range(3):  # warm-up, and AdamW's state exists from here on
        training.step()

    root = Path(args.dir)
    if main_process:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
    accelerator.wait_for_everyone()
    ckpts: dict[str, DynamicCheckpoint] = {}
    completed: dict[str, list[SaveCompleted]] = {}
    for arm in ARMS:
        ckpt = add_arm(accelerator, ckpts, completed, arm, ckpt_config(root / arm.replace(" ", "_"), False))
        ckpt.sink.digests = "written" if arm == "digests" else "none"
    steps = dict.fromkeys(ARMS, 0)
    held: dict[str, list[float]] = {arm: [] for arm in ARMS}
    hash_wait: list[float] = []
    checkpoint_bytes: list[int] = []

    def save(arm: str) -> None:
        ckpt, done = ckpts[arm], completed[arm]
        done.clear()
        ckpt.request("full")
        waited_before = ckpt.sink.hash_wait_seconds
        seconds = 0.0
        while not done:  # decided and written at the next step()
            training.step()
            steps[arm] += 1
            accelerator.wait_for_everyone()
            start = time.perf_counter()
            ckpt.step(steps[arm])
            seconds += time.perf_counter() - start
        held[arm].append(max_over_ranks(accelerator, seconds))
        if arm == "digests":
            hash_wait.append(max_over_ranks(accelerator, ckpt.sink.hash_wait_seconds - waited_before))
            checkpoint_bytes.append(done[0].bytes)
        accelerator.wait_for_everyone()
        if main_process:
            for info in list_checkpoints(ckpt.output_dir):
                withdraw(info.path)

    for round_index in range(args.rounds):
        for arm in ARMS if round_index % 2 == 0 else ARMS[::-1]:
            save(arm)

    for ckpt in ckpts.values():
        ckpt.close()
    if main_process:
        kept = slice(1, None) if args.rounds > 1 else slice(None)
        ratios = [a / b for a, b in zip(held["digests"][kept], held["no digests"][kept], strict=True)]
        no_digests = statistics.median(held["no digests"][kept])
        result: dict[str, Any] = {
            "command": "accelerate launch --multi_gpu --num_processes 2 -m benchmarks.digest_cost "
            f"--rounds {args.rounds}",
            "device": str(accelerator.device),
            "world_size": accelerator.num_processes,
            "parameters": training.parameters,
            "checkpoint_bytes": statistics.median(checkpoint_bytes),
            "rounds": args.rounds,
            "median_seconds_after_round_0": {arm: statistics.median(v[kept]) for arm, v in held.items()},
            "digests_cost_over_sync": statistics.median(ratios) - 1,
            "digests_cost_interval_95": [r - 1 for r in bootstrap_interval(ratios)],
            "digests_cost_target": 0.02,
            "hash_wait_over_sync": statistics.median(hash_wait[kept]) / no_digests,
            "hash_wait_median_seconds": statistics.median(hash_wait[kept]),
            "samples_seconds": held,
            "hash_wait_samples_seconds": hash_wait,
        }
        write_result(args.out, result, REQUIRED)
        keys = (
            "median_seconds_after_round_0",
            "digests_cost_over_sync",
            "digests_cost_interval_95",
            "hash_wait_over_sync",
            "hash_wait_median_seconds",
        )
        print(json.dumps({k: result[k] for k in keys}, indent=2))
        shutil.rmtree(root, ignore_errors=True)
    training.prepared.clear()  # the DDP model before the process group: see release()
    release(accelerator)


if __name__ == "__main__":
    main()
