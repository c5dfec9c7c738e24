"""Per-step cost of ckptbus against ckptbus disabled, in one run: the vote every 100 steps, and at every step.

Run under the launcher, 2 ranks over gloo, from the repository root:

    accelerate launch --multi_gpu --num_processes 2 -m benchmarks.overhead [--smoke]

Four arms train the same GPT-2 (from train.py's make_model, sized so that a
step takes 50 to 90 ms on 2 CPU cores with 2 ranks) in the same processes:

- ``disabled``: no DynamicCheckpoint at all, the baseline.
- ``check_interval=100``: the file trigger (check_interval 100) and the UNIX
  socket on, every signal action ``none``: the ranks vote every 100 steps
  only, and the socket is served from its own thread. Target: throughput
  >= 0.999 of disabled.
- ``all_on``: the same plus the signals at their default actions, which makes
  the ranks vote at every step so that Ctrl+C is honoured within a step (ranks
  on one machine vote through shared memory, pipelined: started at one step,
  read at the next). Target: throughput >= 0.995 of disabled.
- ``all_on_collective``: ``all_on`` with ``CKPTBUS_VOTES=collective``: the
  vote of every step is a pipelined gloo ``all_reduce``, as between machines
  (and as every vote was before shared-memory votes). No target: it shows
  what the shared-memory votes save.

Block means on this shared machine drift by several percent within minutes,
far more than the cost being measured, so the arms are interleaved in short
blocks (``--block`` steps, 20 by default; the arm that goes first rotates each
round) and each round compares its own blocks: the figure is the median over
rounds of ``disabled block time / arm block time``, with a bootstrap 95%
interval that says how fine the measurement is. The enabled arms keep one
DynamicCheckpoint each for the whole run (their own output_dir and socket),
stepped only in their own blocks. The time spent inside ``DynamicCheckpoint.step``
is timed too: the direct cost, which the noise does not hide. The vote alone
is timed both ways (a blocking all_reduce of the 10-int vote and the shared
memory vote, 500 times each). How the ranks vote is read from
``DynamicCheckpoint.status()`` (``votes_every_step``, ``votes``). Results go
to benchmarks/results/overhead.json and overhead.png.

``--smoke``: a model of one block, 2 rounds of 2 steps, 20 timed votes: every
arm end to end in seconds, the result checked and written to a temporary
directory (benchmarks/output.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from ckptbus.plugins import DynamicCheckpoint, release
from ckptbus.plugins.distributed import TorchExchange
from ckptbus.plugins.shared_votes import VOTES_ENV, SharedVotes

from benchmarks.output import add_smoke_option, default_out, write_result
from benchmarks.plots import plot_overhead
from ckptbus import CheckpointConfig
from ckptbus._config import build
from train import ModelConfig, TrainConfig, make_data, make_model

ARMS = ("disabled", "check_interval=100", "all_on", "all_on_collective")
TARGETS = {"check_interval=100": 0.999, "all_on": 0.995}
COMMAND = "accelerate launch --multi_gpu --num_processes 2 -m benchmarks.overhead"
PER_ARM = (
    "median_step_seconds",
    "throughput_ratio_vs_disabled",
    "throughput_ratio_95pct_interval",
    "microseconds_inside_step_call",
)
REQUIRED = (
    "parameters",
    "exchange_median_microseconds",
    *(f"{figure}.{arm}" for figure in PER_ARM for arm in ARMS),
    *(f"shared_memory_votes.{arm}" for arm in ARMS[1:]),
)


def ckpt_config(arm: str, output_dir: str) -> CheckpointConfig:
    """File trigger every 100 steps and the socket on; signals off (``check_interval=100``) or at their defaults."""
    block: dict[str, Any] = {"enabled": True, "check_interval": 100, "event_log": False, "socket": {"enabled": True}}
    if arm == "check_interval=100":
        block["signals"] = {name: "none" for name in ("sigint", "sigterm", "sigusr1", "sighup")}
    return build(CheckpointConfig, {"output_dir": output_dir, "dynamic_checkpoint": block})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--block", type=int, default=20, help="optimizer steps per block")
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=3)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--votes", type=int, default=500, help="votes timed each way")
    parser.add_argument("--out", help="the JSON result (default benchmarks/results/overhead.json)")
    add_smoke_option(parser)
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.block, args.votes = 2, 2, 20
        args.n_embd, args.n_layer, args.n_head, args.seq, args.micro_batch = 32, 1, 2, 16, 2
    args.out = args.out or default_out("overhead", args.smoke)

    started = time.perf_counter()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model_cfg = ModelConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, vocab_size=256)
    cfg = TrainConfig(
        seed=0, micro_batch_size=args.micro_batch, sequence_len=args.seq, dataset_size=64, model=model_cfg
    )
    model = make_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = make_data(cfg).tensors[0][: cfg.micro_batch_size].to(accelerator.device)
    parameters = sum(p.numel() for p in model.parameters())

    def train_step() -> None:
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(2 if args.smoke else 20):  # warm-up: allocator, gloo buffers
        train_step()

    exchange = TorchExchange(accelerator)
    vote = [0] * 10
    exchange_seconds = []
    accelerator.wait_for_everyone()
    for _ in range(args.votes):
        start = time.perf_counter()
        exchange(vote)
        exchange_seconds.append(time.perf_counter() - start)

    votes = SharedVotes.open(accelerator.process_index, accelerator.num_processes, len(vote), exchange)
    shared_seconds = []
    if votes is not None:
        accelerator.wait_for_everyone()
        for _ in range(args.votes):
            start = time.perf_counter()
            votes(vote)
            shared_seconds.append(time.perf_counter() - start)
        votes.close()

    tmp = Path(tempfile.mkdtemp(prefix="ckptbus-bench-")) if accelerator.is_main_process else None
    out_root = [str(tmp)] if tmp else [""]
    torch.distributed.broadcast_object_list(out_root, src=0)
    checkpoints: dict[str, DynamicCheckpoint] = {}
    for arm in ARMS[1:]:
        output_dir = f"{out_root[0]}/{arm.replace('=', '')}"
        os.environ[VOTES_ENV] = "collective" if arm == "all_on_collective" else "auto"
        checkpoints[arm] = ckpt = DynamicCheckpoint(accelerator, ckpt_config(arm, output_dir))
        assert ckpt.status()["votes_every_step"] == arm.startswith("all_on"), f"{arm}: votes at every step"
        if accelerator.is_main_process:
            assert (Path(output_dir) / "ckptbus.sock").is_socket(), f"{arm}: the socket is not served"
    shared = {arm: ckpt.status()["votes"] == "shared_memory" for arm, ckpt in checkpoints.items()}
    samples: dict[str, list[float]] = {arm: [] for arm in ARMS}
    inside: dict[str, float] = dict.fromkeys(ARMS, 0.0)  # seconds spent in DynamicCheckpoint.step
    steps = dict.fromkeys(ARMS, 0)
    for round_index in range(args.rounds):
        shift = round_index % len(ARMS)
        for arm in ARMS[shift:] + ARMS[:shift]:  # rotate which arm goes first
            ckpt = checkpoints.get(arm)
            accelerator.wait_for_everyone()
            start = time.perf_counter()
            for _ in range(args.block):
                train_step()
                steps[arm] += 1
                if ckpt is not None:
                    entered = time.perf_counter()
                    ckpt.step(steps[arm])
                    inside[arm] += time.perf_counter() - entered
            accelerator.wait_for_everyone()
            samples[arm].append((time.perf_counter() - start) / args.block)
    for ckpt in checkpoints.values():
        ckpt.close()
    accelerator.wait_for_everyone()
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)

    if accelerator.is_main_process:
        base = samples["disabled"]
        ratios = {arm: [b / a for b, a in zip(base, samples[arm], strict=True)] for arm in ARMS}
        result = {
            "command": COMMAND,
            "device": str(accelerator.device),
            "world_size": accelerator.num_processes,
            "model": {
                "n_embd": args.n_embd,
                "n_layer": args.n_layer,
                "n_head": args.n_head,
                "vocab_size": model_cfg.vocab_size,
                "sequence_len": args.seq,
                "micro_batch_size": args.micro_batch,
            },
            "parameters": parameters,
            "rounds": args.rounds,
            "steps_per_block": args.block,
            "shared_memory_votes": shared,
            "median_step_seconds": {arm: statistics.median(v) for arm, v in samples.items()},
            "throughput_ratio_vs_disabled": {arm: statistics.median(r) for arm, r in ratios.items()},
            "throughput_ratio_95pct_interval": {arm: bootstrap_interval(r) for arm, r in ratios.items()},
            "microseconds_inside_step_call": {arm: inside[arm] / max(steps[arm], 1) * 1e6 for arm in ARMS},
            "exchange_median_microseconds": statistics.median(exchange_seconds) * 1e6,
            "shared_vote_median_microseconds": statistics.median(shared_seconds) * 1e6 if shared_seconds else None,
            "targets": TARGETS,
            "total_seconds": time.perf_counter() - started,
            "samples": samples,
        }
        plot_overhead(result, write_result(args.out, result, REQUIRED).with_suffix(".png"))
        keys = (
            "model",
            "shared_memory_votes",
            "median_step_seconds",
            "throughput_ratio_vs_disabled",
            "throughput_ratio_95pct_interval",
            "microseconds_inside_step_call",
            "exchange_median_microseconds",
            "shared_vote_median_microseconds",
            "total_seconds",
        )
        print(json.dumps({k: result[k] for k in keys}, indent=2))
    # Our references to the DDP model go before the process group (see release()); the train_step closure holds
    # them, so they are dropped through its cells.
    model = optimizer = None
    checkpoints.clear()
    release(accelerator)


def bootstrap_interval(values: list[float], resamples: int = 2000) -> list[float]:
    """95% interval of the median of ``values`` (bootstrap, fixed seed): how precise the figure is."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return [medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]]


if __name__ == "__main__":
    main()
