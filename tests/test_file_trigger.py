"""The file trigger: ``touch <output_dir>/<trigger_file_path>`` asks every rank for one full checkpoint.

Unit tests drive :class:`FileTrigger` with a real bus and real files; the
end-to-end tests (``slow``) touch the file of real ``accelerate launch`` runs.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from ckptbus.plugins.sources.file import FileTrigger
from runs import TrainingRun

from ckptbus import Bus, CheckpointInfo, SaveRequested, SaveStarted, list_checkpoints
from ckptbus._coordinator import Coordinator
from ckptbus._source import RunInfo

TRIGGER = "axolotl_checkpoint.save"


class Recorder:
    """A bus with a file trigger on it and the requests it published."""

    def __init__(self, out: Path, *, name: str = TRIGGER, interval: int = 5, main: bool = True) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.bus = Bus()
        self.requests: list[SaveRequested] = []
        self.bus.subscribe("save_requested", self.requests.append)
        self.trigger = FileTrigger(name, check_interval=interval)
        self.run = RunInfo(rank=0 if main else 1, world_size=2, output_dir=out)
        self.path = out / name

    def start(self) -> None:
        self.trigger.start(self.bus, self.run)

    def agree(self, *request_ids: str, step: int = 5) -> None:
        """What the sink publishes once every rank agreed to save."""
        self.bus.publish(
            SaveStarted(
                step=step,
                kind="full",
                reasons=("file",),
                request_ids=request_ids,
                labels=(),
                exit_after=False,
                path="unused",
            )
        )


def warnings_of(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


# -- unit: the poller --------------------------------------------------------------------


def test_looks_only_every_check_interval_steps_and_asks_once(tmp_path: Path) -> None:
    rec = Recorder(tmp_path)
    rec.start()
    rec.path.touch()
    for step in range(1, 5):
        rec.trigger.poll(step)
    assert rec.requests == []
    rec.trigger.poll(5)
    assert [(r.kind, r.reason, r.exit_after) for r in rec.requests] == [("full", "file", False)]
    # Still there (not agreed yet): no second request.
    for step in (10, 15, 20):
        rec.trigger.poll(step)
    assert len(rec.requests) == 1
    assert rec.path.exists()


def test_deleted_only_when_every_rank_agreed_then_reusable(tmp_path: Path) -> None:
    rec = Recorder(tmp_path)
    rec.start()
    rec.path.touch()
    rec.trigger.poll(5)
    rec.agree("some-other-request")
    assert rec.path.exists(), "a save for somebody else does not consume the trigger"
    rec.agree(rec.requests[0].request_id)
    assert not rec.path.exists()
    rec.trigger.poll(10)
    assert len(rec.requests) == 1
    for n in range(2, 5):  # reusable any number of times
        rec.path.touch()
        rec.trigger.poll(5 * (n + 1))
        assert len(rec.requests) == n
        rec.agree(rec.requests[-1].request_id)
        assert not rec.path.exists()
    assert len({r.request_id for r in rec.requests}) == 4


def test_a_failed_vote_keeps_the_file_and_the_request(tmp_path: Path) -> None:
    """The trigger, the bus and the coordinator wired as DynamicCheckpoint wires them.

    The first exchange raises: a stand-in for a collective that failed (a real one is in test_coordinator.py).
    """
    rec = Recorder(tmp_path)
    calls = []

    def exchange(vote: Any) -> list[int]:
        calls.append(list(vote))
        if len(calls) == 1:
            raise RuntimeError("peer gone")
        return list(vote)

    coordinator = Coordinator(exchange, check_interval=5)
    rec.bus.subscribe("save_requested", coordinator.enqueue)
    rec.start()
    rec.path.touch()
    rec.trigger.poll(5)
    with pytest.raises(RuntimeError):
        coordinator.decide(5)
    assert rec.path.exists()
    rec.trigger.poll(10)  # no second request for the same touch
    decision = coordinator.decide(10)
    assert decision is not None and [r.request_id for r in decision.requests] == [rec.requests[0].request_id]
    assert rec.path.exists(), "agreed, but not yet started"
    rec.agree(*(r.request_id for r in decision.requests), step=10)
    assert not rec.path.exists()


def test_other_ranks_never_look_and_never_delete(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, main=False)
    rec.path.touch()
    rec.start()
    for step in range(0, 50, 5):
        rec.trigger.poll(step)
    rec.agree("x")
    assert rec.requests == []
    assert rec.path.exists()
    rec.trigger.close()


def test_custom_file_name(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, name="save-now.please", interval=1)
    rec.start()
    (tmp_path / TRIGGER).touch()
    rec.trigger.poll(1)
    assert rec.requests == []
    rec.path.touch()
    rec.trigger.poll(2)
    assert len(rec.requests) == 1
    rec.agree(rec.requests[0].request_id)
    assert not rec.path.exists()
    assert (tmp_path / TRIGGER).exists()


def test_a_symlink_to_a_regular_file_triggers_and_only_the_link_is_removed(tmp_path: Path) -> None:
    rec = Recorder(tmp_path / "out", interval=1)
    rec.start()
    target = tmp_path / "elsewhere"
    target.write_text("keep me")
    rec.path.symlink_to(target)
    rec.trigger.poll(1)
    assert len(rec.requests) == 1
    rec.agree(rec.requests[0].request_id)
    assert not rec.path.is_symlink()
    assert target.read_text() == "keep me"


def test_leftover_trigger_is_removed_at_start_up_without_a_request(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder(tmp_path)
    rec.path.touch()
    rec.start()
    assert not rec.path.exists()
    assert len(warnings_of(caplog, "was already there at start-up (left from an earlier run)")) == 1
    for step in range(0, 30, 5):
        rec.trigger.poll(step)
    assert rec.requests == []


@pytest.mark.parametrize("problem", ["directory", "dangling-symlink", "symlink-loop", "fifo"])
def test_a_path_that_is_not_a_file_warns_once_and_never_asks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, problem: str
) -> None:
    rec = Recorder(tmp_path, interval=1)
    rec.start()
    if problem == "directory":
        rec.path.mkdir()
        text = "is a directory; ignoring it (it will not trigger saves)"
    elif problem == "dangling-symlink":
        rec.path.symlink_to(tmp_path / "gone")
        text = "which does not exist; ignoring it"
    elif problem == "symlink-loop":
        rec.path.symlink_to(rec.path.name)  # stat fails with ELOOP: a path that cannot be inspected
        text = "(Too many levels of symbolic links); ignoring it. Remove it (rm "
    else:
        os.mkfifo(rec.path)
        text = "is not a regular file; ignoring it"
    for step in range(1, 40):
        rec.trigger.poll(step)
    assert rec.requests == []
    assert len(warnings_of(caplog, text)) == 1
    assert len(warnings_of(caplog, "")) == 1, "one warning in all"
    # Fixed: a regular file works again, and a new problem warns again.
    if rec.path.is_dir() and not rec.path.is_symlink():
        rec.path.rmdir()
    else:
        rec.path.unlink()
    rec.path.touch()
    rec.trigger.poll(40)
    assert len(rec.requests) == 1
    rec.agree(rec.requests[0].request_id)
    rec.path.mkdir()
    rec.trigger.poll(41)
    rec.trigger.poll(42)
    assert len(warnings_of(caplog, "is a directory")) == (2 if problem == "directory" else 1)


def test_a_leftover_directory_at_start_up_warns_once_and_is_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder(tmp_path)
    rec.path.mkdir()
    rec.start()
    for step in range(0, 50, 5):
        rec.trigger.poll(step)
    assert rec.path.is_dir()
    assert rec.requests == []
    assert len(warnings_of(caplog, "")) == 1


def test_close_unsubscribes(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, interval=1)
    rec.start()
    rec.path.touch()
    rec.trigger.poll(1)
    rec.trigger.close()
    rec.trigger.close()  # twice is fine
    rec.agree(rec.requests[0].request_id)
    assert rec.path.exists()


# -- end to end: real runs ---------------------------------------------------------------------

INTERVAL = 5


def manifest(ckpt: CheckpointInfo) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((ckpt.path / "ckptbus.json").read_text(encoding="utf-8"))
    return data


def touch_and_wait(run: TrainingRun, name: str = TRIGGER, *, count: int) -> CheckpointInfo:
    """Touch the trigger as a user would; return the new checkpoint, checked to land within one interval."""
    trigger = run.output_dir / name
    before = run.last_step()
    trigger.touch()
    after = run.last_step()  # the main process is at most one step past this when the file appeared
    ckpts: list[CheckpointInfo] = run.wait_for(
        lambda: len(list_checkpoints(run.output_dir)) >= count and list_checkpoints(run.output_dir),
        f"checkpoint {count}",
    )
    ckpt = ckpts[-1]
    assert before <= ckpt.step <= after + INTERVAL, (before, after, ckpt.step)
    assert ckpt.step % INTERVAL == 0
    run.wait_for(lambda: not trigger.exists(), "the trigger to be deleted")
    return ckpt


def check_full_checkpoint(ckpt: CheckpointInfo, *, world_size: int, reason: str) -> None:
    data = manifest(ckpt)
    assert (data["step"], data["kind"], data["reason"], data["world_size"]) == (ckpt.step, "full", reason, world_size)
    assert ckpt.path.name == f"checkpoint-{ckpt.step}"
    assert datetime.fromisoformat(data["created"]).tzinfo is not None
    names = {p.name for p in ckpt.path.iterdir()}
    assert {f"random_states_{rank}.pkl" for rank in range(world_size)} <= names, names
    assert f"random_states_{world_size}.pkl" not in names
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin"} <= names, names


@pytest.mark.slow
def test_two_ranks_touch_twice_then_resume_from_the_first(launch: Callable[..., TrainingRun], tmp_path: Path) -> None:
    run = launch(processes=2)
    run.wait_for_step(12)
    assert len(run.worker_pids()) == 2
    first = touch_and_wait(run, count=1)
    check_full_checkpoint(first, world_size=2, reason="file")
    # One touch, one checkpoint: nothing more over several intervals.
    run.wait_for_step(first.step + 4 * INTERVAL)
    assert [c.step for c in list_checkpoints(run.output_dir)] == [first.step]
    second = touch_and_wait(run, count=2)
    check_full_checkpoint(second, world_size=2, reason="file")
    assert second.step > first.step
    run.wait_for_step(second.step + 1)
    run.kill()
    events = run.events()
    assert [e["reasons"] for e in events if e["event"] == "SaveCompleted"] == [["file"], ["file"]]
    assert sum(e["event"] == "SaveRequested" and e["reason"] == "file" for e in events) == 2
    before = {row["step"]: row["loss"] for row in run.metrics()}

    # The first checkpoint loads with accelerator.load_state in a new 2-rank run.
    # Same max_steps as the first run: the learning-rate schedule depends on it.
    resumed = launch(
        processes=2,
        config={"output_dir": str(tmp_path / "resumed")},
        extra_args=["--resume-from-checkpoint", str(first.path)],
        name="resumed",
    )
    resumed.wait_for_step(first.step + 8)
    resumed.kill()
    rows = [row for row in resumed.metrics() if row["step"] <= first.step + 8]
    assert [row["step"] for row in rows] == list(range(first.step + 1, first.step + 9))
    # Same data order, weights, optimizer and RNG state: the same losses as the run that went on.
    for row in rows:
        assert row["loss"] == pytest.approx(before[row["step"]], rel=1e-4, abs=1e-5), row["step"]
    assert f"resumed from {first.path} at step {first.step}" in resumed.log()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("launcher", "name"), [("accelerate", TRIGGER), ("python", "save-now.please")], ids=["accelerate-1", "python"]
)
def test_one_process(launch: Callable[..., TrainingRun], launcher: str, name: str) -> None:
    config: dict[str, Any] = {"dynamic_checkpoint": {"trigger_file_path": name}}
    run = launch(processes=1, launcher=launcher, config=config)
    run.wait_for_step(8)
    assert len(run.worker_pids()) == 1
    if name != TRIGGER:
        (run.output_dir / TRIGGER).touch()  # not this run's trigger: never fires, never deleted
    first = touch_and_wait(run, name, count=1)
    check_full_checkpoint(first, world_size=1, reason="file")
    second = touch_and_wait(run, name, count=2)
    check_full_checkpoint(second, world_size=1, reason="file")
    run.wait_for_step(second.step + 3 * INTERVAL)
    assert [c.step for c in list_checkpoints(run.output_dir)] == [first.step, second.step]
    assert (run.output_dir / TRIGGER).exists() == (name != TRIGGER)


@pytest.mark.slow
def test_scheduled_saves_and_a_trigger_on_a_scheduled_step_save_once(launch: Callable[..., TrainingRun]) -> None:
    # check_interval == save_steps: the trigger is always seen on a scheduled step.
    every = 10
    run = launch(processes=2, config={"save_steps": every, "dynamic_checkpoint": {"check_interval": every}})
    run.wait_for(lambda: len(list_checkpoints(run.output_dir)) >= 2, "two scheduled checkpoints")
    trigger = run.output_dir / TRIGGER
    trigger.touch()
    both = run.wait_for(
        lambda: [c for c in list_checkpoints(run.output_dir) if c.manifest.reason == "schedule+file"],
        "a checkpoint asked for by the schedule and the file",
    )
    assert len(both) == 1
    run.wait_for(lambda: not trigger.exists(), "the trigger to be deleted")
    run.wait_for(lambda: len([c for c in list_checkpoints(run.output_dir) if c.step > both[0].step]) >= 2, "more")
    run.kill()
    ckpts = list_checkpoints(run.output_dir)
    assert [c.step for c in ckpts] == list(range(every, every * (len(ckpts) + 1), every)), "one save per step"
    for ckpt in ckpts:
        check_full_checkpoint(ckpt, world_size=2, reason="schedule+file" if ckpt.step == both[0].step else "schedule")
    started = [e["step"] for e in run.events() if e["event"] == "SaveStarted"]
    assert started == sorted(set(started)), "no step was saved twice"
    assert started.count(both[0].step) == 1


@pytest.mark.slow
def test_trigger_path_problems_warn_once_and_never_save(launch: Callable[..., TrainingRun], tmp_path: Path) -> None:
    name = "save.now"
    out = tmp_path / "out"
    out.mkdir()
    (out / name).touch()  # left from an earlier run
    run = launch(processes=2, config={"dynamic_checkpoint": {"trigger_file_path": name}})
    trigger = run.output_dir / name

    def count(text: str) -> int:
        return run.log().count(text)

    def quiet_for(intervals: int) -> None:
        run.wait_for_step(run.last_step() + intervals * INTERVAL)
        assert list_checkpoints(run.output_dir) == []
        assert not any(p.name.startswith(("checkpoint-", ".ckptbus-staging-")) for p in run.output_dir.iterdir())

    run.wait_for_step(1)
    assert not trigger.exists()
    quiet_for(4)
    assert count("was already there at start-up (left from an earlier run); removed it without saving") == 1
    (run.output_dir / TRIGGER).touch()  # the default name is not this run's trigger

    problems = [
        ("directory", "is a directory; ignoring it (it will not trigger saves)"),
        ("dangling symlink", "which does not exist; ignoring it"),
        ("symlink loop", "cannot inspect trigger path"),
    ]
    for what, text in problems:
        if what == "directory":
            trigger.mkdir()
        elif what == "dangling symlink":
            trigger.symlink_to(tmp_path / "nowhere")
        else:
            trigger.symlink_to(name)
        run.wait_for(functools.partial(count, text), f"the warning about the {what}")
        quiet_for(6)
        assert count(text) == 1, f"{what}: {count(text)} warnings\n{run.log_tail()}"
        if what == "directory":
            trigger.rmdir()
        else:
            trigger.unlink()
    assert run.alive()

    # The trigger still works after all that, and the default name never fired.
    ckpt = touch_and_wait(run, name, count=1)
    check_full_checkpoint(ckpt, world_size=2, reason="file")
    assert (run.output_dir / TRIGGER).exists()
    assert count("Traceback") == 0
