"""The Python API: a user's own accelerate loop adopts ckptbus in a few lines (tests/scripts/user_loop.py).

Real ``accelerate launch --multi_gpu --num_processes 2`` runs of that script:
the trigger file, the user's receivers on the bus (one of which raises), and
the refusal to run when accelerate and torch.distributed disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from runs import TrainingRun, accelerate_launch, read_jsonl

from ckptbus import list_checkpoints

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parent / "scripts" / "user_loop.py"
TRIGGER = "axolotl_checkpoint.save"


@pytest.fixture
def user_loop(tmp_path: Path) -> Iterator[Callable[..., TrainingRun]]:
    """``user_loop(*args)`` launches user_loop.py on 2 ranks; killed with its process tree at teardown."""
    runs: list[TrainingRun] = []

    def start(*args: str) -> TrainingRun:
        run = TrainingRun(tmp_path, name=f"user{len(runs)}")
        run.config_path.unlink()  # the script takes no config file
        runs.append(run.start(accelerate_launch(SCRIPT, str(run.output_dir), *args)))
        return run

    yield start
    for run in runs:
        run.kill()


def test_user_loop_saves_on_trigger_and_survives_a_raising_receiver(user_loop: Callable[..., TrainingRun]) -> None:
    run = user_loop()
    run.wait_for_step(150)
    trigger = run.output_dir / TRIGGER
    before = run.last_step()
    trigger.touch()
    after = run.last_step()
    # The run stops by itself 20 steps after its first checkpoint (the user's receiver says so).
    assert run.wait_exit() == 0, run.log_tail()

    ckpts = list_checkpoints(run.output_dir)
    assert len(ckpts) == 1, run.log_tail()
    ckpt = ckpts[0]
    # DynamicCheckpoint(accelerator, output_dir): check_interval keeps its default of 100.
    assert before <= ckpt.step <= after + 100 and ckpt.step % 100 == 0, (before, after, ckpt.step)
    manifest = ckpt.manifest
    assert (manifest.kind, manifest.reason, manifest.world_size) == ("full", "file", 2)
    names = {p.name for p in ckpt.path.iterdir()}
    assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors", "optimizer.bin"} <= names
    assert not trigger.exists()

    # The receiver connected after the raising one ran on both ranks, and training went on.
    for rank in (0, 1):
        assert read_jsonl(run.output_dir / f"user-events-{rank}.jsonl") == [
            {"event": "SaveCompleted", "step": ckpt.step, "path": str(ckpt.path)}
        ]
    assert run.last_step() == ckpt.step + 20

    # Each failure is logged (on both ranks) and reported on receiver_failed (in the event log).
    log = run.log()
    for event in ("SaveStarted", "SaveCompleted"):
        assert log.count(f"raised RuntimeError: user receiver broke on {event} (training continues)") == 2, log
    failed = [e for e in run.events() if e["event"] == "ReceiverFailed"]
    assert [(e["signal"], e["error"]) for e in failed] == [
        ("save_started", "RuntimeError: user receiver broke on SaveStarted"),
        ("save_completed", "RuntimeError: user receiver broke on SaveCompleted"),
    ]
    assert all(e["receiver"].endswith("broken") for e in failed)


def test_accelerator_without_cpu_true_is_refused_instead_of_writing_twice(
    user_loop: Callable[..., TrainingRun],
) -> None:
    run = user_loop("--no-cpu")
    code = run.wait_exit()
    log = run.log()
    assert code != 0, log
    # Every rank refuses; the launcher may kill the second one before it prints, so one message is enough.
    assert "SetupError: torch.distributed has 2 ranks but the Accelerator sees 1 process(es)" in log, log
    assert "create the Accelerator with Accelerator(cpu=True) (or set ACCELERATE_USE_CPU=1)" in log
    written = sorted(p.name for p in run.output_dir.iterdir()) if run.output_dir.exists() else []
    assert not [name for name in written if name.startswith(("checkpoint-", ".ckptbus-staging-"))], written
    assert "metrics.jsonl" not in written, "no rank trained"
