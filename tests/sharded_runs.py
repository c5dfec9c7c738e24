"""DeepSpeed and FSDP runs of train.py on 2 ranks, and one scenario that every such engine must pass.

train.py runs unchanged under ``accelerate launch`` with the engine's own
launcher options. On CPU ranks (the test suite) it runs through
tests/scripts/cpu_ranks.py: the settings DeepSpeed needs on CPU, and for
FSDP the test-only shim of tests/fsdp_cpu_shim.py. On GPUs
(tests/manual/sharded_gpu_check.py) it runs as a user runs it.

The scenario (:func:`on_demand_then_exact_resume`), as a user would do it:

1. the trigger file, then ``ckptbus request``: two full checkpoints, in the
   engine's own layout, each loadable with ``accelerator.load_state``;
2. Ctrl+C (SIGINT to the launcher's process group): every rank stops at one
   step K and a weights checkpoint of step K is written;
3. a second run resumes from the request's checkpoint, with a scheduled
   full save at K. Its losses must equal the first run's bit for bit (the
   first run went on uninterrupted after that checkpoint), and the Ctrl+C
   weights must equal the weights of its step-K checkpoint, consolidated
   with the engine's own tool (DeepSpeed's ``zero_to_fp32``, torch's
   ``dcp_to_torch_save``), and load with ``from_pretrained``.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from runs import BIN, REPO, TrainingRun

from ckptbus import checkpoint_path, list_checkpoints, read_checkpoint
from testkit.procs import free_port

CPU_RANKS = Path(__file__).parent / "scripts" / "cpu_ranks.py"
TRIGGER = "axolotl_checkpoint.save"
ASYNC_FALLBACK = "full saves stay synchronous"
ZERO3_GATHERED = "the partitioned weights were gathered onto rank 0"

# 64 sequences of 4 per rank: 8 optimizer steps an epoch, so the resumed stretch may cross an epoch's end.
CONFIG: dict[str, Any] = {
    "dataset_size": 64,
    "micro_batch_size": 4,
    "sequence_len": 16,
    # async_save is asked for, and must fall back (with one warning, from the main process).
    "dynamic_checkpoint": {"enabled": True, "check_interval": 5, "async_save": True},
}


@dataclass(frozen=True)
class Engine:
    """How to launch train.py under one engine, and how to read back the weights of its full checkpoints."""

    name: str
    launcher_args: tuple[str, ...]
    cpu_ranks: str | None
    """The argument of tests/scripts/cpu_ranks.py (``deepspeed`` or ``fsdp``) on CPU ranks; None on GPUs."""
    full_files: tuple[str, ...]
    """Paths, relative to a full checkpoint, that its layout must have."""
    consolidate: Callable[[Path, Path], dict[str, torch.Tensor]]
    """(full checkpoint, scratch dir) → the model's whole state dict, keyed as the transformers model's."""
    env: dict[str, str] = field(default_factory=dict)

    def command(self, run: TrainingRun, *train_args: str) -> list[str]:
        wrapper = [str(CPU_RANKS), self.cpu_ranks] if self.cpu_ranks else []
        return [
            str(BIN / "accelerate"),
            "launch",
            *self.launcher_args,
            "--num_processes",
            "2",
            "--main_process_port",
            str(free_port()),
            *wrapper,
            str(REPO / "train.py"),
            "--config",
            str(run.config_path),
            *train_args,
        ]


# -- reading the weights of a full checkpoint back, with each engine's own tool ------------------------------


def deepspeed_weights(checkpoint: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's own consolidation of the fp32 weights (what the ``zero_to_fp32.py`` beside them does)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # type: ignore[import-untyped]

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="pytorch_model"))


def fsdp_sharded_weights(checkpoint: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """torch.distributed.checkpoint's own conversion of the ``.distcp`` shards into one torch.save file."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    merged = scratch / f"{checkpoint.name}-merged.pt"
    dcp_to_torch_save(checkpoint / "pytorch_model_fsdp_0", merged)
    state = torch.load(merged, weights_only=True)
    return _tensors(state.get("model", state))


def fsdp_full_weights(checkpoint: Path, scratch: Path) -> dict[str, torch.Tensor]:
    return _tensors(torch.load(checkpoint / "pytorch_model_fsdp.bin", weights_only=True))


def _tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


# -- the engines ---------------------------------------------------------------------------------------------

# What a full save writes beside the engine's own files (accelerate's): every rank's RNG states, the scheduler.
COMMON_FILES = ("random_states_0.pkl", "random_states_1.pkl", "scheduler.bin")


def zero(stage: int, *, on_gpus: bool = False) -> Engine:
    """DeepSpeed ZeRO-``stage`` with accelerate's default ``zero3_save_16bit_model: false``.

    A full save is DeepSpeed's engine checkpoint under the tag ``pytorch_model`` (named in ``latest``), with
    its consolidation scripts beside it. ZeRO-2 keeps the whole model in one file; under ZeRO-3 each rank
    writes its shard of the model too. Every rank writes its shard of the optimizer state.
    """
    model = (
        ("pytorch_model/mp_rank_00_model_states.pt",)
        if stage < 3
        else tuple(f"pytorch_model/zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1))
    )
    optimizer = tuple(f"pytorch_model/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1))
    return Engine(
        name=f"zero{stage}",
        launcher_args=("--use_deepspeed", "--zero_stage", str(stage), "--zero3_save_16bit_model", "false"),
        cpu_ranks=None if on_gpus else "deepspeed",
        full_files=("latest", "zero_to_fp32.py", *model, *optimizer, *COMMON_FILES),
        consolidate=deepspeed_weights,
        env={} if on_gpus else {"DS_ACCELERATOR": "cpu"},
    )


def fsdp(state_dict_type: str, *, on_gpus: bool = False) -> Engine:
    """FSDP2 with GPT-2's blocks wrapped, ``SHARDED_STATE_DICT`` or ``FULL_STATE_DICT``.

    Sharded: torch.distributed.checkpoint folders for the model and the optimizer, one ``.distcp`` file per
    rank and a ``.metadata`` each. Full: the whole model and optimizer state gathered onto the main process,
    one file each.
    """
    sharded = state_dict_type == "SHARDED_STATE_DICT"
    files = (
        tuple(f"{d}/{f}" for d in ("pytorch_model_fsdp_0", "optimizer_0") for f in (".metadata", "__0_0.distcp"))
        if sharded
        else ("pytorch_model_fsdp.bin", "optimizer.bin")
    )
    return Engine(
        name=f"fsdp-{'sharded' if sharded else 'full'}",
        launcher_args=(
            "--use_fsdp",
            "--fsdp_version",
            "2",
            "--fsdp_state_dict_type",
            state_dict_type,
            "--fsdp_auto_wrap_policy",
            "TRANSFORMER_BASED_WRAP",
            "--fsdp_transformer_layer_cls_to_wrap",
            "GPT2Block",
        ),
        cpu_ranks=None if on_gpus else "fsdp",
        full_files=(*files, *COMMON_FILES),
        consolidate=fsdp_sharded_weights if sharded else fsdp_full_weights,
    )


# -- the runs ------------------------------------------------------------------------------------------------


class Runs:
    """The runs of one test (``runs(engine, config=..., name=...)`` starts one); :meth:`close` kills them all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.runs: list[TrainingRun] = []

    def __call__(
        self, engine: Engine, *, config: dict[str, Any], name: str, train_args: tuple[str, ...] = ()
    ) -> TrainingRun:
        run = TrainingRun(self.workdir, config=config, name=name, env=engine.env)
        self.runs.append(run)
        return run.start(engine.command(run, *train_args))

    def close(self) -> None:
        for run in self.runs:
            run.kill()


def request_checkpoint(out: Path, run: TrainingRun) -> Path:
    """``ckptbus request``: waits for the checkpoint and prints its path."""
    reply = subprocess.run(
        [str(BIN / "ckptbus"), "request", "--output-dir", str(out), "--label", "sharded", "--timeout", "150"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert reply.returncode == 0, reply.stderr + run.log_tail()
    return Path(reply.stdout.strip())


def same(a: torch.Tensor, b: torch.Tensor, tolerance: float) -> bool:
    """Bit for bit with ``tolerance`` 0; else relatively close (absolutely, near zero)."""
    return torch.equal(a, b) if tolerance == 0 else torch.allclose(a, b, rtol=tolerance, atol=tolerance * 1e-3)


def assert_same_weights(saved: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], tolerance: float) -> None:
    """Every tensor of the weights checkpoint equals the reference's; none is missing but the tied one."""
    missing = set(reference) - set(saved)
    assert missing <= {"lm_head.weight"}, f"not in the weights checkpoint: {sorted(missing)}"  # tied to wte
    assert set(saved) <= set(reference), f"not in the reference: {sorted(set(saved) - set(reference))}"
    different = [k for k in saved if not same(saved[k], reference[k].to(saved[k].dtype), tolerance)]
    assert not different, f"weights differ from the consolidated full checkpoint: {different}"


def assert_no_rank_traceback(run: TrainingRun) -> None:
    """No rank raised (torchrun prefixes what a rank prints with ``[rankN]:``); the launcher's own report of the
    signal it got is expected."""
    raised = [line for line in run.log().splitlines() if "]: Traceback" in line]
    assert not raised, run.log_tail()


def on_demand_then_exact_resume(
    start: Runs, engine: Engine, tmp_path: Path, *, tolerance: float = 0.0
) -> tuple[TrainingRun, TrainingRun]:
    """The scenario of the module docstring; returns the two runs for engine-specific checks.

    ``tolerance``: 0 for bit-exact losses and weights (CPU); a relative
    tolerance where kernels are not deterministic (GPUs).
    """
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    run = start(engine, config=CONFIG, name="first")
    out = run.output_dir
    run.wait_for_step(3, timeout=240)

    (out / TRIGGER).touch()
    by_file = run.wait_for(lambda: list_checkpoints(out), "the file-triggered checkpoint", timeout=120)[0]
    assert (by_file.manifest.kind, by_file.manifest.reason, by_file.manifest.world_size) == ("full", "file", 2)
    assert not (out / TRIGGER).exists()

    by_socket = read_checkpoint(request_checkpoint(out, run))
    assert (by_socket.manifest.kind, by_socket.manifest.reason, by_socket.manifest.labels) == (
        "full",
        "socket",
        ["sharded"],
    )
    assert by_socket.step > by_file.step
    for info in (by_file, by_socket):
        missing = [name for name in engine.full_files if not (info.path / name).exists()]
        assert not missing, f"{info.path} lacks {missing}: {sorted(p.name for p in info.path.iterdir())}"

    os.killpg(run.pid, signal.SIGINT)  # a terminal's Ctrl+C
    assert run.wait_exit(timeout=120) == 1, run.log_tail()  # torchrun re-raises the signal it got
    by_signal = list_checkpoints(out)[-1]
    assert (by_signal.manifest.kind, by_signal.manifest.reason) == ("weights", "signal:SIGINT"), run.log_tail()
    assert by_signal.step == run.last_step()
    log = run.log()
    assert "exiting with status 130" in log, run.log_tail()
    assert log.count(ASYNC_FALLBACK) == 1, [line for line in log.splitlines() if ASYNC_FALLBACK in line]
    assert_no_rank_traceback(run)

    # The second run: from the request's checkpoint, with a scheduled full save at the Ctrl+C's step. Its
    # max_steps stays the first run's (the LR schedule is built from it), so it trains on past that step and is
    # stopped once the checkpoint is complete.
    resumed = start(
        engine,
        config={
            **CONFIG,
            "save_steps": by_signal.step,
            "output_dir": str(tmp_path / "resumed"),
            "dynamic_checkpoint": {"enabled": False},
        },
        train_args=("--resume-from-checkpoint", str(by_socket.path)),
        name="resumed",
    )
    resumed.wait_for(lambda: list_checkpoints(resumed.output_dir), "the scheduled checkpoint", timeout=240)
    resumed.kill()
    first = {r["step"]: r["loss"] for r in run.metrics()}
    again = {r["step"]: r["loss"] for r in resumed.metrics() if r["step"] <= by_signal.step}
    assert sorted(again) == list(range(by_socket.step + 1, by_signal.step + 1)), sorted(again)
    different = {s: (first[s], again[s]) for s in again if abs(again[s] - first[s]) > tolerance * abs(first[s])}
    assert not different, f"losses differ after resuming (step: (uninterrupted, resumed)): {different}"

    reference_ckpt = read_checkpoint(checkpoint_path(resumed.output_dir, by_signal.step))
    assert (reference_ckpt.manifest.kind, reference_ckpt.manifest.reason) == ("full", "schedule")
    reference = engine.consolidate(reference_ckpt.path, tmp_path)
    assert_same_weights(load_file(by_signal.path / "model.safetensors"), reference, tolerance)
    model = GPT2LMHeadModel.from_pretrained(by_signal.path)
    assert same(model.transformer.wte.weight.detach(), reference["transformer.wte.weight"], tolerance)
    return run, resumed


def assert_refused_without_a_gpu(runs: Runs, engine: Engine, name: str) -> None:
    """train.py launched for ``engine`` as on GPUs, on this machine without one: every rank refuses, nothing trains.

    accelerate would run it as plain DDP on the CPU, silently (its DeepSpeed and FSDP need a GPU); train.py
    refuses instead (exit status 2, which torchrun reports as its own 1).
    """
    assert engine.cpu_ranks is None, "launched as on GPUs: without the CPU-ranks wrapper"
    run = runs(engine, config={**CONFIG, "max_steps": 4}, name=f"{engine.name}-without-gpu")
    assert run.wait_exit(300) == 1, run.log_tail()
    log = run.log()
    assert log.count(f"accelerate launch asked for {name} (") == 2, f"one refusal per rank\n{run.log_tail()}"
    assert "exitcode: 2" in log or "exitcode  : 2" in log, run.log_tail()
    assert not (run.output_dir / "metrics.jsonl").exists(), "a step was trained"
    assert list_checkpoints(run.output_dir) == []
