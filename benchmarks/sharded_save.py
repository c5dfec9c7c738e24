"""What a save holds training under DeepSpeed and FSDP, against DDP, and what an asynchronous sharded save would.

    python -m benchmarks.sharded_save          # launches every engine in turn; results in one JSON
    python -m benchmarks.sharded_save --smoke  # DDP and FSDP sharded (every arm), tiny, in a temporary dir

(from the repository root).
Each engine runs as its own ``accelerate launch`` of 2 ranks (on a machine
without GPUs: over gloo, through tests/scripts/cpu_ranks.py, FSDP through
its test-only shim), with a GPT-2 of about 42M parameters and AdamW's state
(as benchmarks/save_stall.py). Arms, interleaved round by round:

- ``save_state``: the engine's own ``accelerator.save_state``, nothing more.
- ``ckptbus full``: a ckptbus full save (staging, fsync, manifest, rename),
  the time the ranks spend in ``ckpt.step()`` at the agreed step. Under
  DeepSpeed and FSDP it is synchronous (``async_save`` falls back).
- ``ckptbus weights``: the weights checkpoint a Ctrl+C writes (under ZeRO-3
  the weights are gathered onto rank 0 first).
- DDP only, ``ckptbus async``: the asynchronous full save, for comparison.
- FSDP sharded only, ``dcp save`` and ``dcp async_save``: what an
  asynchronous sharded save would hold. ``torch.distributed.checkpoint``'s
  ``async_save`` of the same state dict accelerate saves, on a gloo group of
  its own (its writer thread runs the planning collectives): the stall is
  the time until it returns (the state copied into host memory);
  ``dcp async total`` is until its future is done, while training steps run.

Figures are the slowest rank's, medians over the rounds after the first.
Results: benchmarks/results/sharded_save.json.

``--smoke``: a GPT-2 of one block, 2 rounds, under DDP and FSDP sharded
only (between them every arm; the other engines run the same code, and
tests/test_deepspeed.py and test_fsdp.py run them), the result checked and
written to a temporary directory (benchmarks/output.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.output import SMOKE_RESULTS, add_smoke_option, default_out, write_result
from testkit.procs import free_port

REPO = Path(__file__).resolve().parent.parent
CPU_RANKS = REPO / "tests" / "scripts" / "cpu_ranks.py"

ENGINES: dict[str, list[str]] = {
    "ddp": ["--multi_gpu"],
    "zero2": ["--use_deepspeed", "--zero_stage", "2"],
    "zero3": ["--use_deepspeed", "--zero_stage", "3", "--zero3_save_16bit_model", "false"],
    "fsdp sharded": ["--use_fsdp", "--fsdp_version", "2", "--fsdp_state_dict_type", "SHARDED_STATE_DICT"],
    "fsdp full": ["--use_fsdp", "--fsdp_version", "2", "--fsdp_state_dict_type", "FULL_STATE_DICT"],
}
FSDP_WRAP = ["--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap", "GPT2Block"]


# -- the driver: one launch per engine --------------------------------------------------------------------


def launch(engine: str, args: argparse.Namespace, part: Path) -> dict[str, Any]:
    import torch

    on_gpus = torch.cuda.is_available()
    launcher = [*ENGINES[engine], *(FSDP_WRAP if engine.startswith("fsdp") else [])]
    # Without GPUs, DeepSpeed needs its CPU settings and FSDP the test-only shim (tests/scripts/cpu_ranks.py).
    cpu_ranks = "fsdp" if engine.startswith("fsdp") else "deepspeed"
    wrapper = [] if on_gpus or engine == "ddp" else [str(CPU_RANKS), cpu_ranks]
    command = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        *launcher,
        "--num_processes",
        str(args.processes),
        "--main_process_port",
        str(free_port()),
        *wrapper,
        "-m",  # (of accelerate launch, or of cpu_ranks.py, which runs the module as `python -m` would)
        "benchmarks.sharded_save",
        "--worker",
        "--engine",
        engine,
        "--rounds",
        str(args.rounds),
        "--n-layer",
        str(args.n_layer),
        "--n-embd",
        str(args.n_embd),
        "--dir",
        str(Path(args.dir) / engine.replace(" ", "_")),
        "--out",
        str(part),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "ACCELERATE_DISABLE_RICH": "1"}
    print("$", " ".join(command), flush=True)
    # A session of its own, so that a run past its time is killed with its ranks (torchrun's own groups too).
    with subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True) as proc:
        try:
            code = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise SystemExit(f"{engine}: no result within {args.timeout} s") from None
    if code:
        raise SystemExit(f"{engine}: the launch exited with status {code}")
    result: dict[str, Any] = json.loads(part.read_text())
    part.unlink()
    return result


def drive(args: argparse.Namespace) -> None:
    results: dict[str, Any] = {
        "command": " ".join(["python", "-m", "benchmarks.sharded_save", *sys.argv[1:]]),
        "engines": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for engine in args.engines:
        results["engines"][engine] = launch(engine, args, out.with_suffix(f".{engine.replace(' ', '_')}.part"))
    write_result(out, results, [("engines", engine, "median_seconds_after_round_0", arm) for engine, arm in arms(args)])
    for engine, figures in results["engines"].items():
        line = ", ".join(f"{arm} {seconds:.3f} s" for arm, seconds in figures["median_seconds_after_round_0"].items())
        print(f"{engine}: {line}")
    print(f"wrote {out}")


# -- one rank of one engine ---------------------------------------------------------------------------------


def work(args: argparse.Namespace) -> None:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from ckptbus.plugins import DynamicCheckpoint, release
    from torch.utils.data import DataLoader

    from ckptbus import CheckpointConfig, SaveCompleted, list_checkpoints
    from ckptbus._config import build
    from ckptbus._layout import withdraw
    from train import ModelConfig, TrainConfig, make_data, make_model

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    main_process = accelerator.is_main_process
    cfg = TrainConfig(
        seed=0,
        micro_batch_size=1,
        sequence_len=16,
        dataset_size=8,
        model=ModelConfig(n_layer=args.n_layer, n_head=12, n_embd=args.n_embd, vocab_size=256),
    )
    model = make_model(cfg)
    parameters = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # A loader is prepared too: DeepSpeed takes its micro batch size from it.
    loader = DataLoader(make_data(cfg), batch_size=cfg.micro_batch_size)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    batch = make_data(cfg).tensors[0][:1].to(accelerator.device)
    prepared: list[Any] = [model, optimizer]
    del model, optimizer

    def train_step() -> None:
        loss = prepared[0](input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        prepared[1].step()
        prepared[1].zero_grad()

    for _ in range(3):  # warm-up; AdamW's state exists from here on
        train_step()

    root = Path(args.dir)
    if main_process:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
    accelerator.wait_for_everyone()

    def slowest(seconds: float) -> float:
        t = torch.tensor([seconds], dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t.item())

    def ckpt_config(name: str, async_save: bool) -> CheckpointConfig:
        block = {"enabled": False, "check_interval": 1, "event_log": False, "async_save": async_save}
        return build(CheckpointConfig, {"output_dir": str(root / name), "dynamic_checkpoint": block})

    ddp = accelerator.distributed_type in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    sharded_dcp = accelerator.is_fsdp2 and "SHARDED" in str(accelerator.state.fsdp_plugin.state_dict_type)
    ckpts: dict[str, tuple[DynamicCheckpoint, str]] = {
        "ckptbus full": (DynamicCheckpoint(accelerator, ckpt_config("full", False)), "full"),
        "ckptbus weights": (DynamicCheckpoint(accelerator, ckpt_config("weights", False)), "weights"),
    }
    if ddp:
        ckpts["ckptbus async"] = (DynamicCheckpoint(accelerator, ckpt_config("async", True)), "full")
    arms: dict[str, Callable[[int], None]] = {}
    stall: dict[str, list[float]] = {}
    sizes: list[int] = []
    step = [0]

    def run_save_state(round_index: int) -> None:
        target = root / f"save_state-{round_index}"
        accelerator.wait_for_everyone()
        start = time.perf_counter()
        accelerator.save_state(str(target))
        stall["save_state"].append(slowest(time.perf_counter() - start))
        accelerator.wait_for_everyone()
        if main_process:
            shutil.rmtree(target)

    def ckptbus_arm(arm: str) -> Callable[[int], None]:
        ckpt, kind = ckpts[arm]
        done: list[SaveCompleted] = []
        ckpt.bus.subscribe("save_completed", done.append)

        def run(round_index: int) -> None:
            done.clear()
            ckpt.request(kind)
            held = 0.0
            while not done:  # decided at the next step(); an async save is committed at a later one
                train_step()
                step[0] += 1
                start = time.perf_counter()
                ckpt.step(step[0])
                held += time.perf_counter() - start
            stall[arm].append(slowest(held))
            if arm == "ckptbus full":
                sizes.append(done[0].bytes)
            accelerator.wait_for_everyone()
            if main_process:
                for info in list_checkpoints(ckpt.output_dir):
                    withdraw(info.path)

        return run

    for arm in ckpts:
        arms[arm] = ckptbus_arm(arm)
    arms["save_state"] = run_save_state
    if sharded_dcp:
        arms.update(dcp_arms(accelerator, prepared, train_step, root, stall, slowest))
    for arm in arms:
        stall.setdefault(arm, [])

    names = list(arms)
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for arm in names[shift:] + names[:shift]:
            arms[arm](round_index)

    for ckpt, _ in ckpts.values():
        ckpt.close()
    if main_process:
        kept = slice(1, None) if args.rounds > 1 else slice(None)  # round 0 warms the page cache and buffers
        result = {
            "distributed_type": str(accelerator.distributed_type),
            "device": str(accelerator.device),
            "world_size": accelerator.num_processes,
            "parameters": parameters,
            "full_checkpoint_bytes": statistics.median(sizes),
            "rounds": args.rounds,
            "median_seconds_after_round_0": {arm: statistics.median(v[kept]) for arm, v in stall.items()},
            "seconds": stall,
        }
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(root, ignore_errors=True)
    del prepared[:], loader  # the DDP model before the process group: see release()
    release(accelerator)


def dcp_arms(
    accelerator: Any,
    prepared: list[Any],
    train_step: Callable[[], None],
    root: Path,
    stall: dict[str, list[float]],
    slowest: Callable[[float], float],
) -> dict[str, Callable[[int], None]]:
    """``dcp save`` and ``dcp async_save`` of the model and optimizer state that accelerate's FSDP2 save writes."""
    from concurrent.futures import Future

    import torch
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.checkpoint.state_dict_saver import async_save, save

    # The writer thread of async_save runs DCP's planning collectives; on the training's own group they would
    # interleave with the training's collectives. A gloo group of its own keeps them apart.
    group = torch.distributed.new_group(backend="gloo")

    def running_anywhere(running: bool) -> bool:
        flag = torch.tensor([int(running)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def state() -> dict[str, Any]:
        model_state, optimizer_state = get_state_dict(prepared[0], prepared[1])
        return {"model": model_state, "optimizer": optimizer_state}

    def sync(round_index: int) -> None:
        accelerator.wait_for_everyone()
        start = time.perf_counter()
        save(state(), checkpoint_id=str(root / f"dcp-{round_index}"), process_group=group)
        stall["dcp save"].append(slowest(time.perf_counter() - start))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(root / f"dcp-{round_index}")

    def asynchronous(round_index: int) -> None:
        accelerator.wait_for_everyone()
        start = time.perf_counter()
        future = async_save(state(), checkpoint_id=str(root / f"dcp-async-{round_index}"), process_group=group)
        assert isinstance(future, Future)  # (the default stager: a future of the upload, not a staging response)
        stall["dcp async_save"].append(slowest(time.perf_counter() - start))
        # Training goes on while the writer thread writes. Every rank must run the same steps (each one is a
        # collective), so the ranks agree each step whether every writer is done.
        while running_anywhere(not future.done()):
            train_step()
        future.result()
        stall.setdefault("dcp async total", []).append(slowest(time.perf_counter() - start))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(root / f"dcp-async-{round_index}")

    return {"dcp save": sync, "dcp async_save": asynchronous}


def arms(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(engine, arm) of every figure the engines asked for must report."""
    wanted = []
    for engine in args.engines:
        names = ["save_state", "ckptbus full", "ckptbus weights"]
        names += ["ckptbus async"] if engine == "ddp" else []
        names += ["dcp save", "dcp async_save", "dcp async total"] if engine == "fsdp sharded" else []
        wanted += [(engine, name) for name in names]
    return wanted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--n-layer", type=int, default=6)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--dir", help="where the saves go (default outputs/bench-sharded-save)")
    parser.add_argument("--out", help="the JSON result (default benchmarks/results/sharded_save.json)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds one engine may take")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    add_smoke_option(parser)
    args = parser.parse_args()
    if args.smoke and not args.worker:
        args.engines, args.rounds, args.n_layer, args.n_embd, args.timeout = ["ddp", "fsdp sharded"], 2, 1, 48, 300
    args.dir = args.dir or str((SMOKE_RESULTS if args.smoke else REPO / "outputs") / "bench-sharded-save")
    args.out = args.out or default_out("sharded_save", args.smoke)
    if args.worker:
        work(args)
    else:
        drive(args)


if __name__ == "__main__":
    main()
