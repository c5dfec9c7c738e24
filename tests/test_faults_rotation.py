"""SIGKILL during rotation, and while a checkpoint of the same step is being replaced.

Two ways, both with a real SIGKILL:

- Every crash point, one by one: a process commits a checkpoint over one of
  the same step, or rotates, and kills itself before its N-th rename or
  unlink (tests/scripts/crash_at.py), for every N until the operation ends.
- A real 2-rank run killed whole in the middle of a rotation that deletes a
  hundred checkpoints.

After each: the next start's clean-up (``clean_leftovers``) leaves no
staging or trash folder, no step is lost (a replaced step holds the old or
the new checkpoint, whole), every checkpoint listed passes verification of
its digests, and nothing half-deleted is ever listed.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from runs import REPO, TrainingRun
from test_verify import write_checkpoint

from ckptbus._digest import digest_file, verify_checkpoint
from ckptbus._layout import (
    STAGING_PREFIX,
    TRASH_PREFIX,
    checkpoint_path,
    clean_leftovers,
    list_checkpoints,
    scan_checkpoints,
    staging_path,
)

Launch = Callable[..., TrainingRun]
CRASH_AT = REPO / "tests" / "scripts" / "crash_at.py"
KILLED = -9


def crash_at(out: Path, operation: str, n: int) -> int:
    done = subprocess.run(
        [sys.executable, str(CRASH_AT), str(out), operation, str(n)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode in (0, KILLED), done.stderr
    return done.returncode


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith((STAGING_PREFIX, TRASH_PREFIX)))


def assert_every_listed_checkpoint_verifies(out: Path) -> None:
    complete, unusable = scan_checkpoints(out)
    assert not unusable, f"half-deleted or half-written folders named like checkpoints: {unusable}"
    for info in complete:
        report = verify_checkpoint(info, "full")
        assert report.ok, report.problem


def test_sigkill_at_every_point_of_replacing_a_checkpoint_of_the_same_step(tmp_path: Path) -> None:
    points = 0
    for n in range(100):
        out = tmp_path / f"kill-{n}"
        old = write_checkpoint(out, 8, {"model.safetensors": b"old" * 900, "optimizer.bin": b"o" * 2000})
        staging = staging_path(out, 8)
        staging.mkdir()
        (staging / "model.safetensors").write_bytes(b"new" * 900)
        (staging / "optimizer.bin").write_bytes(b"n" * 2000)
        old_model, new_model = digest_file(old / "model.safetensors"), digest_file(staging / "model.safetensors")
        if crash_at(out, "replace", n) == 0:
            break
        points += 1
        clean_leftovers(out)
        assert leftovers(out) == []
        # Killed anywhere, the step is still there, whole: the old checkpoint or the new one.
        [info] = list_checkpoints(out)
        assert info.step == 8
        assert digest_file(info.path / "model.safetensors") in (old_model, new_model)
        assert_every_listed_checkpoint_verifies(out)
    else:
        pytest.fail("the replacement never finished")
    assert points >= 4, "the manifest, both renames and the removal of the old one were each interrupted"
    [info] = list_checkpoints(out)
    assert digest_file(info.path / "model.safetensors") == new_model and leftovers(out) == []


def test_sigkill_at_every_point_of_a_rotation(tmp_path: Path) -> None:
    points = 0
    for n in range(200):
        out = tmp_path / f"kill-{n}"
        for step in (1, 2, 3, 4):
            write_checkpoint(out, step, {"a.bin": bytes([step]) * 100, "b/c.bin": b"c" * 50})
        if crash_at(out, "rotate", n) == 0:
            break
        points += 1
        clean_leftovers(out)
        assert leftovers(out) == []
        steps = [c.step for c in list_checkpoints(out)]
        # Oldest first, one at a time: what is left is the newest few, the newest (protected) always.
        assert steps == list(range(steps[0], 5)), steps
        assert_every_listed_checkpoint_verifies(out)
    else:
        pytest.fail("the rotation never finished")
    assert points >= 3 * 4, "the rename and each removal of the three victims were interrupted"
    assert [c.step for c in list_checkpoints(out)] == [4]


@pytest.mark.slow
def test_sigkill_of_the_whole_job_in_the_middle_of_a_rotation(launch: Launch, tmp_path: Path) -> None:
    """An output_dir with 100 scheduled checkpoints of an earlier run (50 files each, so removing them takes a
    while); a run with ``save_total_limit: 1`` rotates them all out at its first save. Killed as soon as the
    first one is withdrawn, the directory must still make sense."""
    out = tmp_path / "out"
    files = {f"shard-{i:02d}.bin": bytes([i]) * 512 for i in range(50)}
    earlier = range(1000, 1100)
    for step in earlier:
        write_checkpoint(out, step, files)
    run = launch(
        processes=2,
        config={
            "output_dir": str(out),
            "save_steps": 3,
            "save_total_limit": 1,
            "dynamic_checkpoint": {"enabled": False},
        },
    )
    seen = threading.Event()

    def kill_on_first_trash() -> None:
        while not seen.is_set():
            if any(p.name.startswith(TRASH_PREFIX) for p in out.iterdir()):
                run.kill()
                seen.set()
            elif not run.alive():
                return

    killer = threading.Thread(target=kill_on_first_trash)
    killer.start()
    killer.join(timeout=300)
    assert seen.is_set(), f"no rotation started\n{run.log_tail()}"
    run.kill()

    before = [c.step for c in list_checkpoints(out)]
    assert 3 in before, "the checkpoint that caused the rotation was complete before it began"
    assert 1099 in before, "the newest full checkpoint is never rotated out"
    remaining = [s for s in before if s in earlier]
    assert 1 < len(remaining) < len(earlier), f"killed mid-rotation: {len(remaining)} earlier checkpoints left"
    # Nothing half-deleted is listed, even before the clean-up.
    assert not [u for u in scan_checkpoints(out)[1] if u.damaged]
    clean_leftovers(out)
    assert leftovers(out) == []
    after = [c.step for c in list_checkpoints(out)]
    assert set(before) <= set(after) and 3 in after
    assert_every_listed_checkpoint_verifies(out)
    assert verify_checkpoint(list_checkpoints(out)[0], "full").ok
    assert checkpoint_path(out, 3).is_dir()
