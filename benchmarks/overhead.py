"""Per-step cost of ckptbus: enabled (check_interval 1 and 100) against disabled, in one run.

Run under the launcher, 2 ranks over gloo:

    accelerate launch --multi_gpu --num_processes 2 benchmarks/overhead.py

The arms are interleaved block by block (disabled, ci=100, ci=1, disabled,
...) in the same processes, so machine noise hits them alike; each block's
mean step time is one sample, and the figure is the ratio of the arms'
median step times (throughput enabled / disabled). Only the file trigger and
the agreement collective are measured here: what `check_interval` costs.
Results go to benchmarks/results/overhead.json and overhead.png.
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

from ckptbus import CheckpointConfig, DynamicCheckpointConfig  # noqa: E402
from ckptbus._config import build  # noqa: E402
from train import ModelConfig, TrainConfig, make_data, make_model  # noqa: E402

ARMS = ("disabled", "check_interval=100", "check_interval=1")


def ckpt_config(output_dir: str, check_interval: int) -> CheckpointConfig:
    """The file trigger only: other on-demand sources (if the config has them) are switched off."""
    block: dict[str, Any] = {"enabled": True, "check_interval": check_interval, "event_log": False}
    fields = DynamicCheckpointConfig.__dataclass_fields__
    if "signals" in fields:
        block["signals"] = {name: "none" for name in ("sigint", "sigterm", "sigusr1", "sighup")}
    if "socket" in fields:
        block["socket"] = {"enabled": False}
    return build(CheckpointConfig, {"output_dir": output_dir, "dynamic_checkpoint": block})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--block", type=int, default=100, help="optimizer steps per block (a multiple of 100)")
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "overhead.json"))
    args = parser.parse_args()

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    cfg = TrainConfig(
        seed=0,
        micro_batch_size=8,
        sequence_len=args.seq,
        dataset_size=64,
        model=ModelConfig(n_layer=args.n_layer, n_head=4, n_embd=args.n_embd, vocab_size=256),
    )
    model = make_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = make_data(cfg).tensors[0][: cfg.micro_batch_size].to(accelerator.device)

    def train_step() -> None:
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(10):  # warm-up: allocator, gloo buffers
        train_step()

    tmp = Path(tempfile.mkdtemp(prefix="ckptbus-bench-")) if accelerator.is_main_process else None
    out_root = [str(tmp)] if tmp else [""]
    torch.distributed.broadcast_object_list(out_root, src=0)
    samples: dict[str, list[float]] = {arm: [] for arm in ARMS}
    steps = dict.fromkeys(ARMS, 0)
    for round_index in range(args.rounds):
        order = ARMS[round_index % 3 :] + ARMS[: round_index % 3]  # rotate which arm goes first
        for arm in order:
            ckpt = None
            if arm != "disabled":
                interval = int(arm.split("=")[1])
                ckpt = DynamicCheckpoint(accelerator, ckpt_config(f"{out_root[0]}/{interval}", interval))
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

    if accelerator.is_main_process:
        base = statistics.median(samples["disabled"])
        result = {
            "command": "accelerate launch --multi_gpu --num_processes 2 benchmarks/overhead.py",
            "world_size": accelerator.num_processes,
            "parameters": sum(p.numel() for p in model.parameters()),
            "rounds": args.rounds,
            "steps_per_block": args.block,
            "median_step_seconds": {arm: statistics.median(v) for arm, v in samples.items()},
            "throughput_ratio_vs_disabled": {arm: base / statistics.median(v) for arm, v in samples.items()},
            "samples_step_seconds": samples,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        plot(result, Path(args.out).with_suffix(".png"))
        print(json.dumps({k: result[k] for k in ("median_step_seconds", "throughput_ratio_vs_disabled")}, indent=2))
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
    arms = list(result["samples_step_seconds"])
    ax.boxplot([[s * 1000 for s in result["samples_step_seconds"][a]] for a in arms], tick_labels=arms)
    ax.set_ylabel("ms per optimizer step (block means)")
    ratios = result["throughput_ratio_vs_disabled"]
    ax.set_title("ckptbus per-step cost, 2 ranks over gloo\n" + ", ".join(f"{a}: {ratios[a]:.4f}" for a in arms[1:]))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
