"""How long a full save holds training, and how fast a synchronous save persists, side by side in one run.

Run under the launcher, 2 ranks over gloo, from the repository root:

    accelerate launch --multi_gpu --num_processes 2 -m benchmarks.save_stall [--smoke]

A GPT-2 of about 42M parameters with AdamW's state (about 500 MB) is saved
round after round by five arms, interleaved (the arm that goes first rotates)
so that machine noise hits them alike:

- ``save_state``: plain ``accelerator.save_state`` into a fresh directory (no
  fsync, no commit): what training waits for without ckptbus.
- ``ckptbus sync``: a ckptbus full save (staging, every file fsynced, manifest,
  rename): training waits for all of it. Its ``torch.save`` files carry no
  zip CRC32s (the default, ``dynamic_checkpoint.torch_save_crc32: false``).
  The files are spread over the ranks by bytes and written in parallel, each
  digested as it is written.
- ``ckptbus sync 1 writer``: the same, the main process writing every shared
  file (as ``save_state`` does): what the parallel writers bring.
- ``ckptbus sync digests read back``: the same, the digests taken by the
  committer reading the files back after writing (as for files ckptbus does
  not write itself).
- ``ckptbus sync no digests``: the same without digests: what they cost.
- ``ckptbus sync crc32``: the same with ``torch_save_crc32: true``, as
  ``save_state`` writes them.
- ``ckptbus async`` (``dynamic_checkpoint.async_save``): training waits for the
  vote and the copy of the small state (RNG, buffers, scheduler) at the agreed
  step; the writer thread copies the parameters and optimizer state while the
  next step's forward and backward run (``optimizer.step()`` waits for those
  copies if they are not done: that wait is counted), then writes; training
  waits again for the commit at a later step.

For the ckptbus arms the figure is the time the main process (which
snapshots, or writes, the model and optimizer, as ``save_state`` does there)
spends in ``ckpt.step()`` over the steps of the save; the slowest rank's
figure is recorded too (there the other rank waits in the per-step vote for
the main process, whose training step the writer thread slows down on a
machine with few cores), and so is ``async_extra_wall``: how much longer the
steps of the save took than the round's steps without one.
- ``ckptbus async process`` (``async_writer: process``): the same, written by
  a process forked at the agreed step (no host copies; no GIL shared with
  training). ``extra_wall`` for it against the thread's: what the writer costs
  the training steps that run meanwhile.
- ``dd``: ``dd conv=fsync`` of as many bytes as the sync checkpoint holds, into
  the same directory (same disk): the disk's own speed for this write.
- ``dd 2 streams``: the same bytes as two ``dd`` processes of half the size at
  once: what writing in parallel can gain on this disk.

Figures (medians over the rounds after the first, which allocates the async
buffers and warms the page cache): async stall / save_state time (target
<= 0.10), sync throughput / dd throughput (target >= 0.80). Results go to
benchmarks/results/save_stall.json and save_stall.png. The knobs the
``1 writer`` and ``digests`` arms turn are the diagnostics of
``DynamicCheckpoint.sink`` (``parallel_writers``, ``digests``), and so is
the wait it counts for the async arm (``copy_wait_seconds``).

``--smoke``: a GPT-2 of one block, 2 rounds, ``dd`` of one 4 MiB block:
every arm end to end in seconds, the result checked and written to a
temporary directory (benchmarks/output.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from ckptbus.plugins import DynamicCheckpoint, release

from benchmarks.output import SMOKE_RESULTS, add_smoke_option, default_out, write_result
from benchmarks.plots import plot_save_stall
from ckptbus import CheckpointConfig, SaveCompleted, list_checkpoints
from ckptbus._config import build
from ckptbus._layout import withdraw
from train import ModelConfig, TrainConfig, make_data, make_model

REPO = Path(__file__).resolve().parent.parent
COMMAND = "accelerate launch --multi_gpu --num_processes 2 -m benchmarks.save_stall"

ARMS = (
    "save_state",
    "ckptbus sync",
    "ckptbus sync 1 writer",
    "ckptbus sync digests read back",
    "ckptbus sync no digests",
    "ckptbus sync crc32",
    "ckptbus async",
    "ckptbus async process",
    "dd",
    "dd 2 streams",
)
SUMMARY = (
    "async_stall_over_save_state",
    "async_stall_max_over_ranks_over_save_state",
    "async_manifest_stall_over_save_state",
    "async_extra_wall_over_save_state",
    "async_process_stall_max_over_ranks_over_save_state",
    "async_process_extra_wall_over_save_state",
    "sync_throughput_over_dd",
    "sync_crc32_throughput_over_dd",
    "sync_n_writers_over_1_writer",
    "digests_cost_over_sync",
    "digests_read_back_cost_over_sync",
    "dd_2_streams_over_1",
)
"""The ratios the run prints at the end (and docs/performance.md quotes)."""

REQUIRED = (*(f"median_seconds_after_round_0.{arm}" for arm in ARMS), "checkpoint_bytes", *SUMMARY)
SYNC_VARIANTS = {
    # arm: (torch_save_crc32, parallel writers, how digests are taken)
    "ckptbus sync crc32": (True, True, "written"),
    "ckptbus sync 1 writer": (False, False, "written"),
    "ckptbus sync digests read back": (False, True, "read back"),
    "ckptbus sync no digests": (False, True, "none"),
}


def ckpt_config(output_dir: Path, async_save: bool, crc32: bool = False, writer: str = "thread") -> CheckpointConfig:
    """Saves asked for through the API only; the ranks vote at every step (as with signals on)."""
    block = {
        "enabled": False,
        "check_interval": 1,
        "event_log": False,
        "async_save": async_save,
        "torch_save_crc32": crc32,
        "async_writer": writer,
    }
    return build(CheckpointConfig, {"output_dir": str(output_dir), "dynamic_checkpoint": block})


def max_over_ranks(accelerator: Accelerator, seconds: float) -> float:
    """The largest of every rank's ``seconds`` (a collective: every rank calls it)."""
    if accelerator.num_processes == 1:
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


def add_arm(
    accelerator: Accelerator,
    ckpts: dict[str, DynamicCheckpoint],
    completed: dict[str, list[SaveCompleted]],
    arm: str,
    config: CheckpointConfig,
) -> DynamicCheckpoint:
    """A DynamicCheckpoint for ``arm``, its completions recorded in ``completed[arm]``."""
    ckpts[arm] = DynamicCheckpoint(accelerator, config)
    completed[arm] = []
    ckpts[arm].bus.subscribe("save_completed", completed[arm].append)
    return ckpts[arm]


def arguments(name: str, rounds: int) -> argparse.ArgumentParser:
    """The options every save benchmark takes: rounds, model size, where the saves and the results go, --smoke.

    Read them with :func:`parse`, which applies ``--smoke``.
    """
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--n-layer", type=int, default=6)
    parser.add_argument("--n-embd", type=int, default=768, help="a multiple of 12 (the heads)")
    parser.add_argument("--dir", help=f"where the saves go (default outputs/bench-{name.replace('_', '-')})")
    parser.add_argument("--out", help=f"the JSON result (default benchmarks/results/{name}.json)")
    add_smoke_option(parser)
    parser.set_defaults(name=name)
    return parser


def parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The arguments of :func:`arguments`; with ``--smoke`` a model of one block, 2 rounds, a temporary home."""
    args = parser.parse_args()
    folder = f"bench-{args.name.replace('_', '-')}"
    if args.smoke:
        args.rounds, args.n_layer, args.n_embd = 2, 1, 48
    args.dir = args.dir or str(SMOKE_RESULTS / folder if args.smoke else REPO / "outputs" / folder)
    args.out = args.out or default_out(args.name, args.smoke)
    return args


def sync_and_async_arms(
    accelerator: Accelerator, root: Path, sync_name: str, async_name: str
) -> tuple[dict[str, DynamicCheckpoint], dict[str, list[SaveCompleted]]]:
    """A fresh ``root`` with a synchronous and an asynchronous DynamicCheckpoint, and the completions of each."""
    if accelerator.is_main_process:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
    accelerator.wait_for_everyone()
    ckpts: dict[str, DynamicCheckpoint] = {}
    completed: dict[str, list[SaveCompleted]] = {}
    add_arm(accelerator, ckpts, completed, sync_name, ckpt_config(root / "sync", False))
    add_arm(accelerator, ckpts, completed, async_name, ckpt_config(root / "async", True))
    return ckpts, completed


class Training:
    """The model every save benchmark saves: a GPT-2 with AdamW's state, prepared, and one training step on it.

    ``prepared`` holds the model and optimizer; the benchmark clears it before the process group ends (as
    train.py drops its DDP model first: a Reducer freed after the group can hang gloo at exit).
    """

    def __init__(self, accelerator: Accelerator, n_layer: int, n_embd: int) -> None:
        cfg = TrainConfig(
            seed=0,
            micro_batch_size=1,
            sequence_len=16,
            dataset_size=8,
            model=ModelConfig(n_layer=n_layer, n_head=12, n_embd=n_embd, vocab_size=256),
        )
        model = make_model(cfg)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model, optimizer = accelerator.prepare(model, optimizer)
        self.accelerator = accelerator
        self.batch = make_data(cfg).tensors[0][:1].to(accelerator.device)
        self.parameters = sum(p.numel() for p in model.parameters())
        self.prepared: list[Any] = [model, optimizer]

    def step(self) -> None:
        model, optimizer = self.prepared
        loss = model(input_ids=self.batch, labels=self.batch).loss
        self.accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()


def main() -> None:
    args = parse(arguments("save_stall", rounds=4))

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    main_process = accelerator.is_main_process
    training = Training(accelerator, args.n_layer, args.n_embd)
    train_step, parameters, prepared = training.step, training.parameters, training.prepared

    for _ in range(3):  # warm-up, and AdamW's state exists from here on
        train_step()

    root = Path(args.dir)
    ckpts, completed = sync_and_async_arms(accelerator, root, "ckptbus sync", "ckptbus async")
    # The asynchronous save written by a forked process (dynamic_checkpoint.async_writer: process).
    add_arm(
        accelerator,
        ckpts,
        completed,
        "ckptbus async process",
        ckpt_config(root / "async_process", True, False, "process"),
    )
    for arm, (crc32, parallel, digests) in SYNC_VARIANTS.items():
        sink = add_arm(accelerator, ckpts, completed, arm, ckpt_config(root / arm.replace(" ", "_"), False, crc32)).sink
        sink.parallel_writers = parallel
        sink.digests = digests
    steps = dict.fromkeys(ckpts, 0)
    stall: dict[str, list[float]] = {arm: [] for arm in ARMS}
    extra: dict[str, list[float]] = {
        "sync_bytes": [],
        "async_manifest_stall": [],
        "async_write": [],
        "async_extra_wall": [],
        **{f"{arm} max over ranks": [] for arm in ARMS if arm.startswith("ckptbus")},
        "steps_in_flight": [],
    }

    def max_over(seconds: float) -> float:
        return max_over_ranks(accelerator, seconds)

    def run_save_state(round_index: int) -> None:
        target = root / f"save_state-{round_index}"
        accelerator.wait_for_everyone()
        start = time.perf_counter()
        accelerator.save_state(str(target))
        stall["save_state"].append(max_over(time.perf_counter() - start))
        accelerator.wait_for_everyone()
        if main_process:
            shutil.rmtree(target)

    def run_ckptbus(arm: str) -> None:
        ckpt = ckpts[arm]
        done = completed[arm]
        done.clear()
        # A baseline step time in this round, to see how much longer the steps get while a save is in flight.
        accelerator.wait_for_everyone()
        start = time.perf_counter()
        for _ in range(2):
            train_step()
            steps[arm] += 1
            ckpt.step(steps[arm])
        accelerator.wait_for_everyone()
        step_seconds = (time.perf_counter() - start) / 2
        ckpt.request("full")
        held = 0.0
        in_flight = 0
        window = time.perf_counter()
        waited_before = ckpt.sink.copy_wait_seconds
        while not done:  # the save is decided at the first step() and, if async, committed at a later one
            train_step()
            steps[arm] += 1
            start = time.perf_counter()
            ckpt.step(steps[arm])
            held += time.perf_counter() - start
            in_flight += 1
        # An async save copies the parameters and optimizer state while the next step computes; optimizer.step()
        # waits if the copies are not done by then. That wait holds training too.
        held += ckpt.sink.copy_wait_seconds - waited_before
        accelerator.wait_for_everyone()
        extra_wall = max_over(time.perf_counter() - window - in_flight * step_seconds)
        # The main process snapshots (and, synchronously, writes) the model and optimizer; in the vote the other
        # rank waits for it, and for its training step, slowed down by the writer thread (counted in extra_wall).
        stall[arm].append(max_over(held if main_process else 0.0))
        extra[f"{arm} max over ranks"].append(max_over(held))
        event = done[0]
        if arm == "ckptbus sync":
            extra["sync_bytes"].append(event.bytes)
        elif arm == "ckptbus async process":
            extra.setdefault("process_extra_wall", []).append(extra_wall)
        elif arm == "ckptbus async":
            extra["async_manifest_stall"].append(event.stall_seconds)
            extra["async_write"].append(event.write_seconds)
            extra["steps_in_flight"].append(in_flight - 1)
            extra["async_extra_wall"].append(extra_wall)
        accelerator.wait_for_everyone()
        if main_process:
            for info in list_checkpoints(ckpt.output_dir):
                withdraw(info.path)

    def run_dd(round_index: int, streams: int) -> None:
        nbytes = int(extra["sync_bytes"][-1]) if extra["sync_bytes"] else 500 * 2**20
        count = max(1, nbytes // (4 * 2**20) // streams)  # at least one block: a smoke checkpoint is smaller
        accelerator.wait_for_everyone()
        seconds = 0.0
        if main_process:
            targets = [root / f"dd-{round_index}-{i}" for i in range(streams)]
            start = time.perf_counter()
            running = [
                subprocess.Popen(
                    ["dd", "if=/dev/zero", f"of={t}", "bs=4M", f"count={count}", "conv=fsync"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for t in targets
            ]
            if any(p.wait() for p in running):
                raise RuntimeError("dd failed")
            seconds = time.perf_counter() - start
            for t in targets:
                t.unlink()
        name = "dd" if streams == 1 else f"dd {streams} streams"
        stall[name].append(max_over(seconds))
        extra.setdefault(f"{name} bytes", []).append(float(count * streams * 4 * 2**20))

    for round_index in range(args.rounds):
        order = ARMS[round_index % len(ARMS) :] + ARMS[: round_index % len(ARMS)]
        if not extra["sync_bytes"]:  # dd needs the size of a sync checkpoint
            order = (*(a for a in order if not a.startswith("dd")), "dd", "dd 2 streams")
        for arm in order:
            # Every arm starts with no dirty pages: save_state does not fsync, and the writeback of its 500 MB
            # would otherwise land in the fsyncs of whichever arm comes next (in this rotation, always the same).
            os.sync()
            accelerator.wait_for_everyone()
            if arm == "save_state":
                run_save_state(round_index)
            elif arm.startswith("dd"):
                run_dd(round_index, 2 if arm == "dd 2 streams" else 1)
            else:
                run_ckptbus(arm)

    for ckpt in ckpts.values():
        ckpt.close()
    if main_process:
        kept = slice(1, None) if args.rounds > 1 else slice(None)  # round 0 allocates the async buffers
        med = {arm: statistics.median(v[kept]) for arm, v in stall.items()}
        sync_rate = statistics.median(extra["sync_bytes"][kept]) / med["ckptbus sync"]
        dd_rate = statistics.median(extra["dd bytes"][kept]) / med["dd"]
        slowest = {
            arm: statistics.median(extra[f"{arm} max over ranks"][kept]) for arm in ARMS if arm.startswith("ckptbus")
        }
        result: dict[str, Any] = {
            "command": COMMAND,
            "device": str(accelerator.device),
            "world_size": accelerator.num_processes,
            "parameters": parameters,
            "checkpoint_bytes": statistics.median(extra["sync_bytes"]),
            "rounds": args.rounds,
            "median_seconds_after_round_0": med,
            "async_stall_over_save_state": med["ckptbus async"] / med["save_state"],
            "async_stall_target": 0.10,
            "sync_mb_per_s": sync_rate / 1e6,
            "dd_mb_per_s": dd_rate / 1e6,
            "sync_throughput_over_dd": sync_rate / dd_rate,
            "sync_crc32_throughput_over_dd": sync_rate * med["ckptbus sync"] / med["ckptbus sync crc32"] / dd_rate,
            "sync_throughput_target": 0.80,
            "first_async_stall_seconds": stall["ckptbus async"][0],
            "slowest_rank_median_seconds": slowest,
            "sync_n_writers_over_1_writer": slowest["ckptbus sync"] / slowest["ckptbus sync 1 writer"],
            "sync_n_writers_target": 0.75,
            "digests_cost_over_sync": slowest["ckptbus sync"] / slowest["ckptbus sync no digests"] - 1,
            "digests_read_back_cost_over_sync": slowest["ckptbus sync digests read back"]
            / slowest["ckptbus sync no digests"]
            - 1,
            "digests_cost_target": 0.02,
            "dd_2_streams_over_1": med["dd 2 streams"] / med["dd"],
            "samples_seconds": stall,
            "async_stall_max_over_ranks_over_save_state": statistics.median(extra["ckptbus async max over ranks"][kept])
            / med["save_state"],
            "held_max_over_ranks": {arm: extra[f"{arm} max over ranks"] for arm in slowest},
            "async_manifest_stall_over_save_state": statistics.median(extra["async_manifest_stall"][kept])
            / med["save_state"],
            "async_extra_wall_over_save_state": statistics.median(extra["async_extra_wall"][kept]) / med["save_state"],
            "async_process_stall_max_over_ranks_over_save_state": slowest["ckptbus async process"] / med["save_state"],
            "async_process_extra_wall_over_save_state": statistics.median(extra["process_extra_wall"][kept])
            / med["save_state"],
            "async": {
                k: extra[k] for k in ("async_manifest_stall", "async_write", "steps_in_flight", "async_extra_wall")
            },
        }
        plot_save_stall(result, write_result(args.out, result, REQUIRED).with_suffix(".png"))
        keys = ("median_seconds_after_round_0", *SUMMARY)
        print(json.dumps({k: result[k] for k in keys}, indent=2))
        shutil.rmtree(root, ignore_errors=True)
    prepared.clear()  # the DDP model before the process group: see release()
    release(accelerator)


if __name__ == "__main__":
    main()
