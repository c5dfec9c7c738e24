"""save_total_limit: which checkpoints rotation deletes, and when.

The rule (docs/resume.md): checkpoints of the ``save_steps`` schedule count
toward the limit and go oldest step first; on-demand ones (file, signal,
socket, API) are kept unless ``rotate_on_demand: true``; the newest full
checkpoint and the one just written are never deleted; nothing is deleted
before the new checkpoint is complete.

The rule is checked on real checkpoint directories committed the way the
sink commits them, then in real 2-rank runs.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from runs import TrainingRun

from ckptbus import CheckpointConfig, ConfigError, checkpoint_path, list_checkpoints
from ckptbus._config import build
from ckptbus._layout import TRASH_PREFIX, commit, prepare_staging, rotate, rotation_victims

Launch = Callable[..., TrainingRun]
CHECKPOINT_NAME = re.compile(r"^checkpoint-\d+$")


def make(out: Path, step: int, reason: str = "schedule", kind: str = "full") -> Path:
    staging = prepare_staging(out, step)
    (staging / "model.safetensors").write_bytes(b"w" * step)
    final = checkpoint_path(out, step)
    commit(staging, final, {"step": step, "kind": kind, "reason": reason, "world_size": 1})
    return final


def victims(out: Path, limit: int | None, **kwargs: Any) -> list[int]:
    return [c.step for c in rotation_victims(list_checkpoints(out), limit, **kwargs)]


def test_on_demand_checkpoints_are_kept_out_of_rotation_by_default(tmp_path: Path) -> None:
    for step, reason in [(10, "schedule"), (15, "file"), (20, "schedule"), (25, "socket"), (30, "schedule")]:
        make(tmp_path, step, reason)
    make(tmp_path, 35, "schedule+signal:SIGTERM")  # asked for on demand at a scheduled step: on demand
    assert victims(tmp_path, 1) == [10, 20]
    assert victims(tmp_path, 2) == [10]
    assert victims(tmp_path, 3) == []
    assert victims(tmp_path, None) == []


def test_rotate_on_demand_counts_every_checkpoint(tmp_path: Path) -> None:
    for step, reason in [(10, "schedule"), (15, "file"), (20, "schedule"), (25, "socket")]:
        make(tmp_path, step, reason)
    assert victims(tmp_path, 2, on_demand=True) == [10, 15]
    assert victims(tmp_path, 1, on_demand=True) == [10, 15, 20]


def test_newest_full_checkpoint_is_never_deleted(tmp_path: Path) -> None:
    make(tmp_path, 10, "schedule")
    make(tmp_path, 20, "schedule")
    make(tmp_path, 30, "signal:SIGINT", kind="weights")  # newer, but weights only: no resume from it
    assert victims(tmp_path, 1, on_demand=True) == [10]


def test_the_checkpoint_just_written_is_kept_after_resuming_from_an_older_one(tmp_path: Path) -> None:
    """Resumed from 10 while 20 (of the earlier run) exists: the new 15 has not the highest step."""
    for step in (10, 20, 15):
        make(tmp_path, step)
    assert victims(tmp_path, 1) == [10, 15]
    assert victims(tmp_path, 1, keep=[checkpoint_path(tmp_path, 15)]) == [10]
    assert rotate(tmp_path, 1, keep=[checkpoint_path(tmp_path, 15)]) == [checkpoint_path(tmp_path, 10)]
    assert [c.step for c in list_checkpoints(tmp_path)] == [15, 20]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TRASH_PREFIX)]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"rotate_on_demand": "yes"}, "config key 'rotate_on_demand': got 'yes'"),
        (
            {"dynamic_checkpoint": {"on_save_failure": "retry"}},
            "config key 'dynamic_checkpoint.on_save_failure': got 'retry'",
        ),
    ],
)
def test_lifecycle_config_keys_are_checked(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(CheckpointConfig, {"output_dir": "o", **data})
    assert build(CheckpointConfig, {"output_dir": "o"}).rotate_on_demand is False
    assert build(CheckpointConfig, {"output_dir": "o"}).dynamic_checkpoint.on_save_failure == "continue"


class CountWatcher:
    """Watches ``output_dir`` from a thread; records the fewest checkpoints seen once ``floor`` existed.

    It counts ``checkpoint-<step>`` names in one ``listdir`` (a single getdents call for a directory this
    small, atomic with respect to rename): a name appears only when its checkpoint is complete and goes
    at once when rotation renames it away. Reading each manifest while rotation runs would race with it.
    """

    def __init__(self, out: Path, floor: int) -> None:
        self.out, self.floor = out, floor
        self.reached = False
        self.fewest: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            try:
                count = len([n for n in os.listdir(self.out) if CHECKPOINT_NAME.match(n)])
            except FileNotFoundError:  # the run has not made output_dir yet
                continue
            if count >= self.floor:
                self.reached = True
            if self.reached:
                self.fewest = count if self.fewest is None else min(self.fewest, count)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.slow
@pytest.mark.parametrize("rotate_on_demand", [False, True])
def test_rotation_in_a_real_run(launch: Launch, rotate_on_demand: bool) -> None:
    limit = 2
    run = launch(
        processes=2,
        config={
            "max_steps": 40,
            "save_steps": 4,
            "save_total_limit": limit,
            "rotate_on_demand": rotate_on_demand,
            "dynamic_checkpoint": {"check_interval": 5},
        },
    )
    watcher = CountWatcher(run.output_dir, limit)
    try:
        run.wait_for_step(6)
        (run.output_dir / "axolotl_checkpoint.save").touch()
        assert run.wait_exit() == 0, run.log_tail()
    finally:
        watcher.stop()
    made = [e for e in run.events() if e["event"] == "SaveCompleted"]
    on_demand = [e["step"] for e in made if e["reasons"] != ["schedule"]]
    assert on_demand and on_demand[0] <= 30, f"the trigger made no early checkpoint: {made}"
    scheduled = [e["step"] for e in made if e["reasons"] == ["schedule"]]
    kept = [c.step for c in list_checkpoints(run.output_dir)]
    if rotate_on_demand:
        assert kept == sorted(e["step"] for e in made)[-limit:]
    else:
        assert kept == sorted(on_demand + scheduled[-limit:])
    # Deleting only after the new checkpoint is complete: once `limit` existed, never fewer were there.
    assert watcher.reached and watcher.fewest is not None and watcher.fewest >= limit
    assert "save_total_limit=2: deleted" in run.log()
