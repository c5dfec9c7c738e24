"""One cell of benchmarks/scale.py: one model size at one world size, run under the launcher.

    accelerate launch --multi_gpu --num_processes 2 -m benchmarks.scale_worker --n-layer 16 --n-embd 512 \
        --n-head 8 --out /tmp/cell.json

(benchmarks/scale.py starts it for every cell.) A GPT-2 built from a config is prepared with AdamW and trained
2 steps, so that AdamW's state exists, and saved once with ``save_state``, unmeasured (a warm-up); then, for
``--rounds`` rounds, with the arm that goes first rotating each round (as in benchmarks/save_stall.py), three
arms save it:

- ``save_state``: plain ``accelerator.save_state`` into a fresh directory, barriers around; wall time, max over
  ranks.
- ``sync``: a ckptbus full save through ``DynamicCheckpoint`` (``request`` + ``step``): wall time of the
  ``step()`` that saves, max over ranks, and the checkpoint manifest's ``write_seconds`` / ``stall_seconds``.
- ``async`` (``dynamic_checkpoint.async_save: true``): the time the main process (which snapshots the model and
  optimizer, as ``save_state`` writes them there) is held, summed over the steps until the checkpoint is
  committed, with a training step before each: in ``ckpt.step()``, plus in ``optimizer.step()``, where ckptbus
  may hold the step until its writer thread copied the state (a step pre-hook; timed here between a global
  optimizer pre-hook, which torch runs first, and a pre-hook registered after ckptbus's; ckptbus's own count
  of that wait, ``DynamicCheckpoint.sink.copy_wait_seconds``, is recorded beside it as a cross-check). The
  slowest rank's figure and the manifest's ``stall_seconds`` / ``write_seconds`` are recorded too.

Bytes are the total size of a checkpoint's files. Every checkpoint is deleted once measured. The main process
writes the samples, their medians and every rank's peak RSS to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from ckptbus.plugins import release
from torch.optim.optimizer import register_optimizer_step_pre_hook

from benchmarks.save_stall import REPO, sync_and_async_arms
from ckptbus import SaveCompleted, list_checkpoints, read_checkpoint
from ckptbus._layout import withdraw
from train import ModelConfig, TrainConfig, make_data, make_model

ARMS = ("save_state", "sync", "async")


def dir_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(os.path.getsize(Path(d) / f) for d, _, files in os.walk(path) for f in files)


def max_over_ranks(value: float) -> float:
    if not torch.distributed.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


def every_rank(value: float) -> list[float]:
    if not torch.distributed.is_initialized():
        return [value]
    out = [torch.zeros(1, dtype=torch.float64) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(out, torch.tensor([value], dtype=torch.float64))
    return [float(t.item()) for t in out]


def peak_rss_bytes() -> float:
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-layer", type=int, required=True)
    parser.add_argument("--n-embd", type=int, required=True)
    parser.add_argument("--n-head", type=int, required=True)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=str(REPO / "outputs" / "bench-scale" / "saves"), help="where saves go")
    parser.add_argument("--out", required=True, help="JSON result (main process)")
    args = parser.parse_args()
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)  # the tied lm_head, on every save

    started = time.perf_counter()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    main_process = accelerator.is_main_process
    world = accelerator.num_processes

    def log(message: str) -> None:
        if main_process:
            print(f"[scale] W={world} {message}", flush=True)

    cfg = TrainConfig(
        seed=0,
        micro_batch_size=1,
        sequence_len=16,
        dataset_size=8,
        model=ModelConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, vocab_size=args.vocab_size),
    )
    model = make_model(cfg)
    parameters = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = make_data(cfg).tensors[0][:1].to(accelerator.device)
    # In a list the closures read, so that the end can free the DDP model before the process group (train.py).
    prepared: list[Any] = [model, optimizer]
    del model, optimizer

    def train_step() -> None:
        loss = prepared[0](input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        prepared[1].step()
        prepared[1].zero_grad()

    for _ in range(2):  # AdamW's state exists from here on
        train_step()

    # Time held in optimizer.step() by step pre-hooks registered during an async save (ckptbus's hold): from the
    # global pre-hook, which runs before every optimizer's own, to one registered after ckptbus's.
    hold = {"since": 0.0, "total": 0.0}

    def before_pre_hooks(*_: Any) -> None:
        hold["since"] = time.perf_counter()

    def after_ckptbus_hooks(*_: Any) -> None:
        hold["total"] += time.perf_counter() - hold["since"]

    inner_optimizer = getattr(prepared[1], "optimizer", prepared[1])  # the torch optimizer in accelerate's wrapper
    global_hook = register_optimizer_step_pre_hook(before_pre_hooks)
    log(f"{parameters:,} parameters prepared and trained 2 steps in {time.perf_counter() - started:.1f} s")

    root = Path(args.dir)
    ckpts, completed = sync_and_async_arms(accelerator, root, "sync", "async")
    steps = dict.fromkeys(ckpts, 0)
    keys = (
        "save_state_s",
        "save_state_bytes",
        "sync_s",
        "sync_bytes",
        "sync_manifest_bytes",
        "sync_write_s",
        "sync_manifest_stall_s",
        "async_stall_s",
        "async_held_in_step_s",
        "async_held_in_optimizer_s",
        "async_ckptbus_copy_wait_s",
        "async_stall_max_ranks_s",
        "async_manifest_stall_s",
        "async_write_s",
        "async_bytes",
        "async_steps_in_flight",
        "async_commit_wall_s",
    )
    samples: dict[str, list[float]] = {k: [] for k in keys}

    def measure_and_delete(arm: str, event: SaveCompleted) -> None:
        """Main process: the manifest's figures and the bytes on disk, then delete the checkpoint."""
        if main_process:
            info = read_checkpoint(event.path)
            samples[f"{arm}_bytes"].append(float(dir_bytes(info.path)))
            if arm == "sync":
                samples["sync_manifest_bytes"].append(float(info.manifest.bytes))
            samples[f"{arm}_write_s"].append(info.manifest.write_seconds)
            samples[f"{arm}_manifest_stall_s"].append(info.manifest.stall_seconds)
            for found in list_checkpoints(ckpts[arm].output_dir):
                withdraw(found.path)
        accelerator.wait_for_everyone()

    def run_save_state(round_index: int) -> None:
        target = root / f"save_state-{round_index}"
        accelerator.wait_for_everyone()
        start = time.perf_counter()
        accelerator.save_state(str(target))
        seconds = max_over_ranks(time.perf_counter() - start)
        accelerator.wait_for_everyone()
        samples["save_state_s"].append(seconds)
        if main_process:
            samples["save_state_bytes"].append(float(dir_bytes(target)))
            shutil.rmtree(target)
        accelerator.wait_for_everyone()

    def run_sync() -> None:
        ckpt, done = ckpts["sync"], completed["sync"]
        done.clear()
        train_step()
        steps["sync"] += 1
        ckpt.request("full")
        accelerator.wait_for_everyone()
        start = time.perf_counter()
        while not done:  # decided, written and committed at this step()
            ckpt.step(steps["sync"])
            steps["sync"] += 1
        samples["sync_s"].append(max_over_ranks(time.perf_counter() - start))
        measure_and_delete("sync", done[0])

    def run_async() -> None:
        ckpt, done = ckpts["async"], completed["async"]
        done.clear()
        ckpt.request("full")
        accelerator.wait_for_everyone()
        held = 0.0
        in_flight = 0
        late_hook = None
        hold["total"] = 0.0
        waited_before = ckpt.sink.copy_wait_seconds  # ckptbus's own count of that wait: a cross-check
        window = time.perf_counter()
        while not done:  # decided and snapshotted at the first step(), committed at a later one
            train_step()
            steps["async"] += 1
            start = time.perf_counter()
            ckpt.step(steps["async"])
            held += time.perf_counter() - start
            in_flight += 1
            if late_hook is None:  # the save began in this step(): ckptbus's pre-hook, if any, is registered now
                late_hook = inner_optimizer.register_step_pre_hook(after_ckptbus_hooks)
        if late_hook is not None:
            late_hook.remove()
        held_in_optimizer = hold["total"]
        waited = ckpt.sink.copy_wait_seconds - waited_before
        samples["async_ckptbus_copy_wait_s"].append(max_over_ranks(waited if main_process else 0.0))
        samples["async_commit_wall_s"].append(max_over_ranks(time.perf_counter() - window))
        samples["async_held_in_step_s"].append(max_over_ranks(held if main_process else 0.0))
        samples["async_held_in_optimizer_s"].append(max_over_ranks(held_in_optimizer if main_process else 0.0))
        samples["async_stall_s"].append(max_over_ranks(held + held_in_optimizer if main_process else 0.0))
        samples["async_stall_max_ranks_s"].append(max_over_ranks(held + held_in_optimizer))
        samples["async_steps_in_flight"].append(float(in_flight - 1))
        measure_and_delete("async", done[0])

    # One unmeasured save_state first: the first write of a fresh process into the page cache is the slowest (up
    # to 5x here), and whichever arm went first in round 1 would pay it. The first async save's allocation of its
    # host buffers is ckptbus's own cost and stays measured (in round 1; the median over rounds drops it).
    run_save_state(-1)
    samples["save_state_s"].clear()
    samples["save_state_bytes"].clear()
    for round_index in range(args.rounds):
        order = ARMS[round_index % len(ARMS) :] + ARMS[: round_index % len(ARMS)]
        for arm in order:
            if arm == "save_state":
                run_save_state(round_index)
            elif arm == "sync":
                run_sync()
            else:
                run_async()
        log(
            f"round {round_index + 1}/{args.rounds} ({' > '.join(order)}): save_state "
            f"{samples['save_state_s'][-1]:.2f} s, sync {samples['sync_s'][-1]:.2f} s, async stall "
            f"{samples['async_stall_s'][-1]:.2f} s (of which in optimizer.step "
            f"{samples['async_held_in_optimizer_s'][-1]:.2f} s; write "
            f"{samples['async_write_s'][-1] if main_process else 0:.2f} s)"
        )

    global_hook.remove()
    for ckpt in ckpts.values():
        ckpt.close()
    rss = every_rank(peak_rss_bytes())
    if main_process:
        result: dict[str, Any] = {
            "parameters": parameters,
            "world_size": world,
            "device": str(accelerator.device),
            "torch_threads": torch.get_num_threads(),
            "model": {"n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head, "vocab": args.vocab_size},
            "rounds": args.rounds,
            "median": {k: statistics.median(v) for k, v in samples.items() if v},
            "samples": samples,
            "peak_rss_bytes_per_rank": rss,
            "worker_seconds": time.perf_counter() - started,
        }
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(root, ignore_errors=True)
    prepared.clear()  # the DDP model before the process group: see release()
    ckpts.clear()
    release(accelerator)


if __name__ == "__main__":
    main()
