"""Per-step cost of ckptbus against ckptbus disabled, in one run: the vote every 100 steps, and at every step.

Run under the launcher, 2 ranks over gloo:

    accelerate launch --multi_gpu --num_processes 2 benchmarks/overhead.py

Three arms train the same GPT-2 (from train.py's make_model, sized so that a
step takes 55 to 90 ms on 2 CPU cores with 2 ranks) in the same processes:

- ``disabled``: no DynamicCheckpoint at all, the baseline.
- ``check_interval=100``: the file trigger (check_interval 100) and the UNIX
  socket on, every signal action ``none``: the ranks vote (one all_reduce of a
  few ints) every 100 steps only, and the socket is served from its own
  thread. Target: throughput >= 0.999 of disabled.
- ``all_on``: the same plus the signals at their default actions, which makes
  the ranks vote at every step so that Ctrl+C is honoured within a step (with
  several ranks the vote is pipelined: started at one step, read at the next,
  and blocking only at check_interval multiples). Target: throughput >= 0.995
  of disabled.

The arms are interleaved block by block (the arm that goes first rotates each
round), so the noise of a shared machine hits them alike; each block's mean
step time is one sample. A block is a multiple of 100 steps, so the
``check_interval=100`` arm votes the same number of times in every block.
Every enabled block gets a fresh DynamicCheckpoint with its own output_dir
(and so its own socket), closed after the block. The figures are the ratio of
each arm's median step time to disabled's (throughput) and the difference in
microseconds per step; the exchange alone (the all_reduce of a 10-int vote,
500 times) is timed too. Results go to benchmarks/results/overhead.json and
overhead.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ckptbus.plugins import DynamicCheckpoint  # noqa: E402
from ckptbus.plugins.accelerate_sink import TorchExchange  # noqa: E402

from ckptbus import CheckpointConfig  # noqa: E402
from ckptbus._config import build  # noqa: E402
from train import ModelConfig, TrainConfig, make_data, make_model  # noqa: E402

ARMS = ("disabled", "check_interval=100", "all_on")
TARGETS = {"check_interval=100": 0.999, "all_on": 0.995}
COMMAND = "accelerate launch --multi_gpu --num_processes 2 benchmarks/overhead.py"


def ckpt_config(arm: str, output_dir: str) -> CheckpointConfig:
    """File trigger every 100 steps and the socket on; signals off (``check_interval=100``) or at their defaults."""
    block: dict[str, Any] = {"enabled": True, "check_interval": 100, "event_log": False, "socket": {"enabled": True}}
    if arm == "check_interval=100":
        block["signals"] = {name: "none" for name in ("sigint", "sigterm", "sigusr1", "sighup")}
    return build(CheckpointConfig, {"output_dir": output_dir, "dynamic_checkpoint": block})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--block", type=int, default=100, help="optimizer steps per block (a multiple of 100)")
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=3)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "overhead.json"))
    args = parser.parse_args()
    if args.block % 100:
        parser.error("--block must be a multiple of 100 (the check_interval=100 arm votes once every 100 steps)")

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

    for _ in range(20):  # warm-up: allocator, gloo buffers
        train_step()

    exchange = TorchExchange(accelerator)
    vote = [0] * 10
    exchange_seconds = []
    accelerator.wait_for_everyone()
    for _ in range(500):
        start = time.perf_counter()
        exchange(vote)
        exchange_seconds.append(time.perf_counter() - start)

    tmp = Path(tempfile.mkdtemp(prefix="ckptbus-bench-")) if accelerator.is_main_process else None
    out_root = [str(tmp)] if tmp else [""]
    torch.distributed.broadcast_object_list(out_root, src=0)
    samples: dict[str, list[float]] = {arm: [] for arm in ARMS}
    steps = dict.fromkeys(ARMS, 0)
    pipelined: dict[str, bool] = {}  # whether the arm's per-step votes overlap the next step
    for round_index in range(args.rounds):
        shift = round_index % len(ARMS)
        order = ARMS[shift:] + ARMS[:shift]  # rotate which arm goes first
        for arm in order:
            ckpt = None
            if arm != "disabled":
                output_dir = f"{out_root[0]}/{arm.replace('=', '')}-{round_index:02d}"  # one socket per arm/round
                ckpt = DynamicCheckpoint(accelerator, ckpt_config(arm, output_dir))
                every_step = ckpt._coordinator.every_step
                assert every_step == (arm == "all_on"), f"{arm}: the ranks vote at every step: {every_step}"
                pipelined[arm] = bool(getattr(ckpt._coordinator, "pipelined", False))
                if accelerator.is_main_process:
                    assert (Path(output_dir) / "ckptbus.sock").is_socket(), f"{arm}: the socket is not served"
            accelerator.wait_for_everyone()
            start = time.perf_counter()
            for _ in range(args.block):
                train_step()
                steps[arm] += 1
                if ckpt is not None:
                    ckpt.step(steps[arm])
            accelerator.wait_for_everyone()
            samples[arm].append((time.perf_counter() - start) / args.block)
            if ckpt is not None:
                ckpt.close()
    accelerator.wait_for_everyone()
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)

    if accelerator.is_main_process:
        medians = {arm: statistics.median(v) for arm, v in samples.items()}
        base = medians["disabled"]
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
            "pipelined_votes": pipelined,
            "median_step_seconds": medians,
            "throughput_ratio_vs_disabled": {arm: base / m for arm, m in medians.items()},
            "extra_microseconds_per_step": {arm: (m - base) * 1e6 for arm, m in medians.items()},
            "exchange_median_microseconds": statistics.median(exchange_seconds) * 1e6,
            "targets": TARGETS,
            "total_seconds": time.perf_counter() - started,
            "samples": samples,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        plot(result, Path(args.out).with_suffix(".png"))
        keys = (
            "model",
            "median_step_seconds",
            "throughput_ratio_vs_disabled",
            "extra_microseconds_per_step",
            "exchange_median_microseconds",
            "total_seconds",
        )
        print(json.dumps({k: result[k] for k in keys}, indent=2))
        print(f"disabled median step: {base * 1000:.1f} ms")
    # Release the DDP model before the process group (see train.py: gloo can hang at exit otherwise).
    model = optimizer = None  # the train_step closure holds them: drop them through its cells
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    arms = list(result["samples"])
    ax.boxplot([[s * 1000 for s in result["samples"][a]] for a in arms], tick_labels=arms)
    ax.set_ylabel("ms per optimizer step (block means)")
    ratios = result["throughput_ratio_vs_disabled"]
    ax.set_title("ckptbus per-step cost, 2 ranks over gloo\n" + ", ".join(f"{a}: {ratios[a]:.4f}" for a in arms[1:]))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
