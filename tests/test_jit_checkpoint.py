"""``TrainingArguments(enable_jit_checkpoint=True)`` next to the ckptbus callback: ckptbus takes SIGTERM over.

transformers 5.24 (the suite's) and 5.25 (the newest, tests/newest_versions.sh)
both have the JIT checkpoint; an older one has not, and the tests that need
it are skipped there, saying why. The unit tests build a real Trainer, which installs
transformers' real SIGTERM handler; the end-to-end test sends SIGTERM to the
launcher's process group of a 2-rank run with both turned on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from ckptbus.plugins.integrations.jit_checkpoint import take_over_sigterm
from runs import REPO, TrainingRun, accelerate_launch

from ckptbus import CheckpointConfig, DynamicCheckpointConfig, list_checkpoints
from ckptbus._config import SignalsConfig
from testkit.procs import wait_for


def _has_jit() -> bool:
    from transformers import TrainingArguments

    return "enable_jit_checkpoint" in getattr(TrainingArguments, "__dataclass_fields__", {})


needs_jit = pytest.mark.skipif(not _has_jit(), reason="this transformers has no enable_jit_checkpoint")


def _config(sigterm: str = "full_exit", *, enabled: bool = True) -> CheckpointConfig:
    signals = SignalsConfig(sigterm=sigterm)  # type: ignore[arg-type]
    return CheckpointConfig(
        output_dir="o", dynamic_checkpoint=DynamicCheckpointConfig(enabled=enabled, signals=signals)
    )


def test_without_the_option_nothing_is_done_or_said() -> None:
    before = signal.getsignal(signal.SIGTERM)
    for args in (SimpleNamespace(), SimpleNamespace(enable_jit_checkpoint=False)):
        assert take_over_sigterm(args, _config()).message == ""
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.fixture
def jit_trainer(tmp_path: Path) -> Any:
    """A real Trainer with enable_jit_checkpoint=True: transformers' SIGTERM handler installed, put back after."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    before = signal.getsignal(signal.SIGTERM)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], enable_jit_checkpoint=True)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=32, n_positions=16)
    trainer = Trainer(model=GPT2LMHeadModel(config), args=args)
    assert signal.getsignal(signal.SIGTERM) is not before, "transformers installed no SIGTERM handler"
    yield trainer, before
    signal.signal(signal.SIGTERM, before)


@needs_jit
def test_ckptbus_takes_sigterm_back_from_transformers(jit_trainer: Any) -> None:
    trainer, before = jit_trainer
    done = take_over_sigterm(trainer.args, _config())
    assert signal.getsignal(signal.SIGTERM) is before
    assert "ckptbus handles SIGTERM for this run instead of transformers' JIT checkpoint" in done.message
    assert "every rank saves a full checkpoint at the same step" in done.message


@needs_jit
@pytest.mark.parametrize("enabled", [True, False])
def test_sigterm_none_leaves_transformers_its_handler(jit_trainer: Any, enabled: bool) -> None:
    trainer, _ = jit_trainer
    installed = signal.getsignal(signal.SIGTERM)
    done = take_over_sigterm(trainer.args, _config("none", enabled=enabled))
    assert signal.getsignal(signal.SIGTERM) is installed
    assert "ckptbus does not handle SIGTERM" in done.message


@needs_jit
def test_a_handler_replaced_since_is_left_alone(jit_trainer: Any) -> None:
    trainer, _ = jit_trainer

    def mine(signum: int, frame: object) -> None:
        pass

    signal.signal(signal.SIGTERM, mine)
    done = take_over_sigterm(trainer.args, _config())
    assert signal.getsignal(signal.SIGTERM) is mine and "not the one installed now" in done.message


@needs_jit
@pytest.mark.slow
def test_sigterm_with_both_on_gives_one_ckptbus_checkpoint(tmp_path: Path) -> None:
    out, hashes = tmp_path / "out", tmp_path / "hashes.jsonl"
    run = TrainingRun(tmp_path, name="both")
    command = accelerate_launch(
        "benchmarks.preemption_worker", "--arm", "both", "--out", str(out), "--hashes", str(hashes), module=True
    )
    try:
        run.start(command, cwd=REPO)
        wait_for(lambda: hashes.exists() and len(hashes.read_text().splitlines()) >= 5, "5 steps", 300)
        os.killpg(run.pid, signal.SIGTERM)
        run.wait_exit(120)
    finally:
        run.kill()
    log = run.log()
    assert log.count("ckptbus handles SIGTERM for this run instead of transformers' JIT checkpoint") == 1, log[-3000:]
    (info,) = list_checkpoints(out)
    assert (info.manifest.kind, info.manifest.reason) == ("full", "signal:SIGTERM")
    folders = sorted(p.name for p in out.glob("checkpoint-*"))
    assert folders == [info.path.name], f"transformers saved a checkpoint of its own too: {folders}"
    assert not list(out.rglob("checkpoint-is-incomplete.txt"))


def test_the_module_imports_without_transformers_jit() -> None:
    """The callback imports the module on every transformers version (it reads attributes, imports nothing)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import ckptbus.plugins.integrations.jit_checkpoint as m; print(m.__all__)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "take_over_sigterm" in proc.stdout, proc.stderr
