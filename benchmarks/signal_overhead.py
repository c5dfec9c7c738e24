"""Per-step cost of honouring signals within one step: ckptbus with signal handlers against ckptbus disabled.

Run under the launcher, 2 ranks over gloo:

    accelerate launch --multi_gpu --num_processes 2 benchmarks/signal_overhead.py

With any signal handled, the ranks vote at every optimizer step (one
all_reduce of a few ints) so that a signal reaching any one rank stops all of
them at the same step. The two arms are interleaved block by block in the
same processes (the first arm of each round alternates), so machine noise hits
them alike; each block's mean step time is one sample. The figures are the
ratio of the arms' median step times (throughput with signals / disabled)
and the difference in microseconds per step; the exchange alone is timed too.
The default model is configs/tiny.yaml's, where a fixed per-step cost shows
the most. Results go to benchmarks/results/signal_overhead.json.
"""

from __future__ import annotations

import argparse
import gc
import json
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

from ckptbus import CheckpointConfig, DynamicCheckpointConfig  # noqa: E402
from ckptbus._config import build  # noqa: E402
from train import ModelConfig, TrainConfig, make_data, make_model  # noqa: E402

ARMS = ("disabled", "signals")


def ckpt_config(output_dir: str) -> CheckpointConfig:
    """Default signal handling; the file trigger at its default interval (100); other sources off."""
    block: dict[str, Any] = {"enabled": True, "event_log": False}
    if "socket" in DynamicCheckpointConfig.__dataclass_fields__:
        block["socket"] = {"enabled": False}
    return build(CheckpointConfig, {"output_dir": output_dir, "dynamic_checkpoint": block})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--block", type=int, default=200, help="optimizer steps per block")
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "signal_overhead.json"))
    args = parser.parse_args()

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    cfg = TrainConfig(
        seed=0,
        micro_batch_size=8,
        sequence_len=args.seq,
        dataset_size=64,
        model=ModelConfig(n_layer=args.n_layer, n_head=2, n_embd=args.n_embd, vocab_size=64),
    )
    model = make_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = make_data(cfg).tensors[0][: cfg.micro_batch_size].to(accelerator.device)

    def train_step(model: Any, optimizer: Any) -> None:
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(20):  # warm-up: allocator, gloo buffers
        train_step(model, optimizer)

    exchange = TorchExchange(accelerator)
    vote = [0] * 10
    exchange_seconds = []
    for _ in range(500):
        start = time.perf_counter()
        exchange(vote)
        exchange_seconds.append(time.perf_counter() - start)

    tmp = Path(tempfile.mkdtemp(prefix="ckptbus-bench-")) if accelerator.is_main_process else None
    out_root = [str(tmp)] if tmp else [""]
    torch.distributed.broadcast_object_list(out_root, src=0)
    samples: dict[str, list[float]] = {arm: [] for arm in ARMS}
    steps = dict.fromkeys(ARMS, 0)
    for round_index in range(args.rounds):
        order = ARMS if round_index % 2 == 0 else ARMS[::-1]
        for arm in order:
            ckpt = DynamicCheckpoint(accelerator, ckpt_config(out_root[0])) if arm == "signals" else None
            if ckpt is not None:
                assert ckpt._coordinator.every_step, "signals are handled, so the ranks must vote at every step"
            accelerator.wait_for_everyone()
            start = time.perf_counter()
            for _ in range(args.block):
                train_step(model, optimizer)
                steps[arm] += 1
                if ckpt is not None:
                    ckpt.step(steps[arm])
            accelerator.wait_for_everyone()
            samples[arm].append((time.perf_counter() - start) / args.block)
            if ckpt is not None:
                ckpt.close()

    if accelerator.is_main_process:
        medians = {arm: statistics.median(v) for arm, v in samples.items()}
        result = {
            "command": "accelerate launch --multi_gpu --num_processes 2 benchmarks/signal_overhead.py",
            "device": str(accelerator.device),
            "world_size": accelerator.num_processes,
            "parameters": sum(p.numel() for p in model.parameters()),
            "rounds": args.rounds,
            "steps_per_block": args.block,
            "median_step_seconds": medians,
            "throughput_ratio_signals_vs_disabled": medians["disabled"] / medians["signals"],
            "added_microseconds_per_step": (medians["signals"] - medians["disabled"]) * 1e6,
            "exchange_median_microseconds": statistics.median(exchange_seconds) * 1e6,
            "samples_step_seconds": samples,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        keys = (
            "median_step_seconds",
            "throughput_ratio_signals_vs_disabled",
            "added_microseconds_per_step",
            "exchange_median_microseconds",
        )
        print(json.dumps({k: result[k] for k in keys}, indent=2))
    # The DDP model goes before the process group (see train.py: a gloo hang at exit otherwise).
    del model, optimizer
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()


if __name__ == "__main__":
    main()
