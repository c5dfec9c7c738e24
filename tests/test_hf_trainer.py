"""The transformers.Trainer plugin (``ckptbus.plugins.hf_trainer.DynamicCheckpointCallback``).

The config tests build the callback in this process. The end-to-end test
runs a real ``Trainer`` (tiny GPT-2, data made in the script) on 2 ranks over
gloo with ``accelerate launch --multi_gpu`` (tests/scripts/trainer_run.py),
configured by an axolotl-style YAML file: the trigger file, ``ckptbus
request`` over the real socket, Ctrl+C to the launcher's process group, then
a second run that resumes from the newest complete full checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from runs import BIN, TrainingRun, accelerate_launch, read_jsonl
from test_torch_save_crc import bad_crc_records

from ckptbus import CheckpointError, ConfigError, SetupError, list_checkpoints, read_checkpoint

SCRIPT = Path(__file__).parent / "scripts" / "trainer_run.py"

# The example of axolotl's checkpoint-saving docs, inside a config with the usual axolotl keys around it.
AXOLOTL = """
base_model: openai-community/gpt2
datasets:
  - path: tatsu-lab/alpaca
    type: alpaca
sequence_len: 16
micro_batch_size: 4
learning_rate: 0.0002
output_dir: ./outputs/lora-out
save_steps: 500  # Scheduled checkpoints
dynamic_checkpoint:
  enabled: true
  check_interval: 50
  trigger_file_path: "axolotl_checkpoint.save"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "axolotl.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# -- configuration (no processes) -------------------------------------------------


def test_an_axolotl_config_works_unchanged(tmp_path: Path) -> None:
    from ckptbus.plugins.hf_trainer import DynamicCheckpointCallback

    callback = DynamicCheckpointCallback.from_yaml(write(tmp_path, AXOLOTL), ignore_unknown=True)
    cfg = callback.config
    assert (cfg.output_dir, cfg.save_steps) == ("./outputs/lora-out", 500)
    dyn = cfg.dynamic_checkpoint
    assert (dyn.enabled, dyn.check_interval, dyn.trigger_file_path) == (True, 50, "axolotl_checkpoint.save")


def test_keys_that_are_not_ckptbus_are_refused_unless_ignored(tmp_path: Path) -> None:
    from ckptbus.plugins.hf_trainer import DynamicCheckpointCallback

    path = write(tmp_path, AXOLOTL)
    with pytest.raises(ConfigError, match="unknown config key 'base_model'"):
        DynamicCheckpointCallback.from_yaml(path)


def test_a_typo_inside_dynamic_checkpoint_is_refused_even_when_ignoring_other_keys(tmp_path: Path) -> None:
    from ckptbus.plugins.hf_trainer import DynamicCheckpointCallback

    path = write(tmp_path, AXOLOTL.replace("check_interval: 50", "check_intervall: 50"))
    with pytest.raises(ConfigError, match=r"axolotl\.yaml: unknown config key 'dynamic_checkpoint\.check_intervall'; "):
        DynamicCheckpointCallback.from_yaml(path, ignore_unknown=True)
    with pytest.raises(ConfigError, match=r"'dynamic_checkpoint\.check_interval': got 0"):
        DynamicCheckpointCallback({"dynamic_checkpoint": {"check_interval": 0}})


def test_output_dir_comes_from_training_arguments(tmp_path: Path) -> None:
    from ckptbus.plugins.hf_trainer import DynamicCheckpointCallback
    from transformers import TrainerControl, TrainerState, TrainingArguments

    callback = DynamicCheckpointCallback({"dynamic_checkpoint": {"enabled": True, "check_interval": 10}})
    with pytest.raises(SetupError, match="output_dir is not known yet"):
        _ = callback.output_dir
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[])
    callback.on_init_end(args, TrainerState(), TrainerControl())
    assert callback.output_dir == tmp_path / "run"
    assert callback.resume_checkpoint("latest") is None  # nothing there yet: a fresh start

    other = DynamicCheckpointCallback({"output_dir": str(tmp_path / "elsewhere")})
    with pytest.raises(SetupError, match=r"differs from TrainingArguments\.output_dir"):
        other.on_init_end(args, TrainerState(), TrainerControl())


def test_resume_checkpoint_takes_complete_full_checkpoints_only(tmp_path: Path) -> None:
    from ckptbus.plugins.hf_trainer import DynamicCheckpointCallback

    from ckptbus._layout import write_manifest

    def checkpoint(step: int, kind: str) -> Path:
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"x" * step)
        write_manifest(path, {"step": step, "kind": kind, "reason": "file", "world_size": 2})
        return path

    full, weights = checkpoint(10, "full"), checkpoint(20, "weights")
    (tmp_path / "checkpoint-30").mkdir()  # a Trainer save interrupted before its manifest
    callback = DynamicCheckpointCallback({"output_dir": str(tmp_path)})
    assert callback.resume_checkpoint("latest") == str(full)
    assert callback.resume_checkpoint(full) == str(full)
    assert callback.resume_checkpoint() is None  # resume_from_checkpoint unset
    with pytest.raises(CheckpointError, match="weights-only checkpoint"):
        callback.resume_checkpoint(weights)
    with pytest.raises(CheckpointError, match=r"has no ckptbus\.json"):
        callback.resume_checkpoint(tmp_path / "checkpoint-30")
    assert read_checkpoint(full).manifest.reason == "file"


# -- a real Trainer on 2 ranks ------------------------------------------------------


@pytest.fixture
def trainer_run(tmp_path: Path) -> Iterator[Callable[..., TrainingRun]]:
    """``trainer_run(max_steps, *args)``: trainer_run.py on 2 ranks with an axolotl config; killed at teardown."""
    runs: list[TrainingRun] = []

    def start(max_steps: int, *args: str) -> TrainingRun:
        config: dict[str, Any] = yaml.safe_load(AXOLOTL)
        config.update(output_dir=str(tmp_path / "out"), max_steps=max_steps)
        config["dynamic_checkpoint"]["check_interval"] = 5
        run = TrainingRun(tmp_path, name=f"trainer{len(runs)}", config=config, raw_config=True)
        runs.append(run.start(accelerate_launch(SCRIPT, str(run.config_path), *args)))
        return run

    yield start
    for run in runs:
        run.kill()


@pytest.mark.slow
def test_trainer_file_socket_ctrl_c_then_resume(trainer_run: Callable[..., TrainingRun]) -> None:
    run = trainer_run(100000)
    out = run.output_dir
    run.wait_for_step(6, timeout=240)

    # The trigger file: a full, resumable checkpoint written by the Trainer, with ckptbus's manifest.
    (out / "axolotl_checkpoint.save").touch()
    by_file = run.wait_for(lambda: list_checkpoints(out), "the file-triggered checkpoint")[0]
    assert (by_file.manifest.kind, by_file.manifest.reason, by_file.manifest.world_size) == ("full", "file", 2)
    names = {p.name for p in by_file.path.iterdir()}
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= names, names
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= names  # every rank's part is in before the manifest
    assert not (out / "axolotl_checkpoint.save").exists()
    # The Trainer wrote it without torch.save's zip CRC32s, as ckptbus saves are (torch_save_crc32: false).
    assert bad_crc_records(by_file.path / "optimizer.pt"), "optimizer.pt still carries CRC32s"

    # `ckptbus request` over the socket: the reply is the path, once the Trainer's checkpoint is complete.
    request = subprocess.run(
        [str(BIN / "ckptbus"), "request", "--output-dir", str(out), "--label", "from the test", "--timeout", "120"],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert request.returncode == 0, request.stderr + run.log_tail()
    by_socket = read_checkpoint(request.stdout.strip())
    assert (by_socket.manifest.kind, by_socket.manifest.reason, by_socket.manifest.labels) == (
        "full",
        "socket",
        ["from the test"],
    )
    assert by_socket.step > by_file.step

    # Ctrl+C in the terminal: SIGINT to the launcher's process group. Every rank stops at one step; weights only.
    os.killpg(run.pid, signal.SIGINT)
    assert run.wait_exit(timeout=120) == 1  # torchrun re-raises the signal it got (its own traceback and status)
    ckpts = list_checkpoints(out)
    by_signal = ckpts[-1]
    assert (by_signal.manifest.kind, by_signal.manifest.reason) == ("weights", "signal:SIGINT"), ckpts
    names = {p.name for p in by_signal.path.iterdir()}
    assert "model.safetensors" in names and "config.json" in names
    assert not names & {"optimizer.pt", "rng_state_0.pth"}, names
    log = run.log()
    # Both ranks got the press, but a rank whose signal lands after the step's vote already decided the stop
    # never polls again: one or two "received" lines, never more (the forwarded copy is the same press).
    assert 1 <= log.count("SIGINT received") <= 2, run.log_tail()
    assert "KeyboardInterrupt" not in log, run.log_tail()
    completed = [e for e in read_jsonl(out / "ckptbus-events.jsonl") if e["event"] == "SaveCompleted"]
    assert [(e["step"], e["reasons"]) for e in completed] == [
        (by_file.step, ["file"]),
        (by_socket.step, ["socket"]),
        (by_signal.step, ["signal"]),
    ]
    assert not (out / "ckptbus.sock").exists()

    # Resume: `latest` is the newest complete *full* checkpoint (the socket's), not the weights one.
    (out / "metrics.jsonl").unlink()
    resumed = trainer_run(by_socket.step + 4, "--resume", "latest")
    assert resumed.wait_exit(timeout=240) == 0, resumed.log_tail()
    steps = [row["step"] for row in resumed.metrics()]
    assert steps == list(range(by_socket.step + 1, by_socket.step + 5)), steps


@pytest.mark.slow
def test_training_arguments_without_use_cpu_are_refused_instead_of_writing_twice(
    trainer_run: Callable[..., TrainingRun],
) -> None:
    run = trainer_run(6, "--no-cpu")
    assert run.wait_exit(timeout=240) != 0
    log = run.log()
    assert "SetupError: torch.distributed has 2 ranks but the Trainer sees 1 process(es)" in log, run.log_tail()
    assert "pass TrainingArguments(use_cpu=True)" in log
    written = sorted(p.name for p in run.output_dir.iterdir()) if run.output_dir.exists() else []
    assert not [name for name in written if name.startswith("checkpoint-")], written
