"""Saves that fail, and ranks killed in the middle of a save, in real 2-rank runs.

The failures are real, never mocked exceptions:

- "file too large": ``RLIMIT_FSIZE`` lowered on one running rank with
  ``prlimit`` (Python ignores SIGXFSZ, so its writes past the limit fail
  with EFBIG); lifting the limit again lets the next save succeed.
- "no space left on device": ``output_dir`` on a small tmpfs, filled up
  (skipped where this user cannot mount).
- "operation not permitted": ``output_dir`` made immutable with
  ``chattr +i`` (root ignores permission bits; skipped where chattr does not
  work), so the staging directory cannot be created.
- SIGKILL of rank 0 (the committer), of rank 1, or of the whole job, at
  several points of a save of a larger model.

What must hold after each: every rank agrees the save failed (no hang),
``SaveFailed`` with the reason is on the bus (the event log), the staging
directory is gone (or, after SIGKILL, cleaned at the next start), older
checkpoints are intact and remain the latest, and training goes on (or
stops with status 1 under ``on_save_failure: stop``).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from runs import TrainingRun

from ckptbus import checkpoint_path, latest_full, list_checkpoints, read_checkpoint
from ckptbus._layout import STAGING_PREFIX
from testkit.procs import limit_file_size

pytestmark = pytest.mark.slow

Launch = Callable[..., TrainingRun]

# About 53k parameters: model.safetensors is about 210 kB, far above the limits set below.
SMALL = {"model": {"n_layer": 1, "n_head": 2, "n_embd": 64, "vocab_size": 32}}
# About 7M parameters (85 MB of state): a save lasts long enough to kill a rank in the middle of it.
LARGE = {"model": {"n_layer": 4, "n_head": 4, "n_embd": 384, "vocab_size": 32}}


def outcome_events(run: TrainingRun) -> list[dict[str, Any]]:
    return [e for e in run.events() if e["event"] in ("SaveCompleted", "SaveFailed")]


def trigger_and_wait(run: TrainingRun, timeout: float = 120.0) -> dict[str, Any]:
    """Touch the trigger file; return the ``SaveCompleted`` or ``SaveFailed`` event of the save it asks for."""
    seen = len(outcome_events(run))
    (run.output_dir / "axolotl_checkpoint.save").touch()
    return dict(run.wait_for(lambda: outcome_events(run)[seen:][:1], "the outcome of the save", timeout)[0])


def staging_dirs(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith(STAGING_PREFIX))


def assert_only(out: Path, steps: list[int]) -> None:
    """Exactly these complete checkpoints, each intact, and nothing being staged."""
    assert [c.step for c in list_checkpoints(out)] == steps
    for step in steps:
        read_checkpoint(checkpoint_path(out, step))
    assert staging_dirs(out) == []


def test_file_too_large_on_one_rank_fails_the_save_on_every_rank(launch: Launch) -> None:
    """On rank 0 (the committer), then on rank 1, in the same run: each failed save is agreed by every rank, and
    the next one, with the limit lifted, succeeds."""
    run = launch(processes=2, config={**SMALL, "dynamic_checkpoint": {"check_interval": 2}})
    pids = run.wait_for_ranks()
    run.wait_for_step(2)
    first = trigger_and_wait(run)
    assert first["event"] == "SaveCompleted", first
    saved = [first["step"]]

    for rank in (0, 1):
        # Rank 1 writes only random_states_1.pkl (about 14 kB). Rank 0 writes the model (about 210 kB), and
        # keeps appending to metrics, event log and the run's log: leave those room.
        sizes = [p.stat().st_size for p in (run.log_path, run.output_dir / "metrics.jsonl")]
        limit = 4096 if rank == 1 else max(sizes) + 64 * 1024
        assert limit < 200 * 1024
        limit_file_size(pids[rank], limit)
        failed = trigger_and_wait(run)
        assert failed["event"] == "SaveFailed", failed
        # Every rank reports the real reason (the main process publishes it, so a waiting request gets it).
        assert f"writing failed on rank {rank}" in failed["error"], failed["error"]
        # Each writer reports EFBIG in its own words (safetensors: "File too large (os error 27)"; torch's zip
        # writer: "file write failed" or "unexpected pos ..."): the exception type and its text travel as they are.
        assert re.match(rf"writing failed on rank {rank}: \w+: \S", failed["error"]), failed["error"]
        assert_only(run.output_dir, saved)
        assert run.wait_for_step(failed["step"] + 4), "training goes on after a failed save"

        limit_file_size(pids[rank], None)
        again = trigger_and_wait(run)
        assert again["event"] == "SaveCompleted", again
        saved.append(again["step"])
        assert_only(run.output_dir, saved)
    assert sorted(run.rank_pids()) == [0, 1]


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (root only; skipped where mounting is not allowed). Unmounted after the runs are killed."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_disk_full_fails_the_save_and_training_goes_on(small_tmpfs: Path, launch: Launch) -> None:
    out = small_tmpfs / "out"
    run = launch(processes=2, config={"output_dir": str(out), "dynamic_checkpoint": {"check_interval": 2}})
    run.wait_for_step(2)
    first = trigger_and_wait(run)
    assert first["event"] == "SaveCompleted", first
    size = int(first["bytes"])

    # Leave room for half a checkpoint (and the metrics): the optimizer state no longer fits.
    filler = small_tmpfs / "filler"
    free = os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize
    with open(filler, "wb") as fh:
        fh.write(b"\0" * (free - size // 2))
    failed = trigger_and_wait(run)
    assert failed["event"] == "SaveFailed", failed
    assert "writing failed on rank 0" in failed["error"], failed["error"]
    assert_only(out, [first["step"]])
    run.wait_for_step(failed["step"] + 4)

    filler.unlink()
    again = trigger_and_wait(run)
    assert again["event"] == "SaveCompleted", again
    assert_only(out, [first["step"], again["step"]])
    run.kill()


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    """``chattr +i``: no entry can be created in ``path``, even by root (skips the test where chattr fails)."""
    result = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"chattr +i does not work here: {result.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.parametrize("on_failure", ["continue", "stop"])
def test_an_output_dir_that_turns_read_only_mid_run(launch: Launch, tmp_path: Path, on_failure: str) -> None:
    """The output_dir turns read-only while the run trains (a disk remounted read-only after errors): the save fails,
    agreed by every rank; training goes on, or stops with ``on_save_failure: stop``. (An output_dir nothing can be
    written to from the start is refused before training: tests/test_output_dir_writable.py.)"""
    out = tmp_path / "out"
    trigger = tmp_path / "now.save"  # outside output_dir: nothing can be created inside it once it is immutable
    dynamic = {"check_interval": 2, "on_save_failure": on_failure, "trigger_file_path": str(trigger)}
    run = launch(processes=2, config={**SMALL, "output_dir": str(out), "dynamic_checkpoint": dynamic})

    def save_now() -> dict[str, Any]:
        seen = len(outcome_events(run))
        trigger.touch()
        return dict(run.wait_for(lambda: outcome_events(run)[seen:][:1], "the outcome of the save", 120.0)[0])

    run.wait_for_step(2)
    first = save_now()
    assert first["event"] == "SaveCompleted", first
    with immutable(out):  # appending to metrics and the event log still works; creating an entry does not
        failed = save_now()
        assert failed["event"] == "SaveFailed", failed
        assert "creating the staging directory failed on rank 0" in failed["error"], failed
        assert "Operation not permitted" in failed["error"]
        if on_failure == "continue":
            assert run.wait_for_step(failed["step"] + 4), "training goes on after a failed save"
        else:
            assert run.wait_exit() == 1, run.log_tail()
            assert run.last_step() == failed["step"]
            assert f"training stopped at step {failed['step']} because the checkpoint could not be saved" in run.log()
    assert_only(out, [first["step"]])


def staged_file(out: Path, name: str | None) -> Callable[[], bool]:
    """True once a staging directory exists (holding ``name``, if given)."""

    def check() -> bool:
        with contextlib.suppress(OSError):
            for entry in out.iterdir():
                if entry.name.startswith(STAGING_PREFIX) and (name is None or (entry / name).exists()):
                    return True
        return False

    return check


@pytest.mark.parametrize(
    ("victim", "moment"),
    [
        pytest.param("rank0", None, id="rank0-committer-staging-created"),
        pytest.param("rank1", "model.safetensors", id="rank1-while-writing-the-optimizer"),
        pytest.param("job", "random_states_1.pkl", id="whole-job-while-committing"),
    ],
)
def test_sigkill_mid_save_keeps_the_previous_checkpoint(
    launch: Launch, tmp_path: Path, victim: str, moment: str | None
) -> None:
    out = tmp_path / "out"
    config = {**LARGE, "output_dir": str(out), "save_total_limit": 1, "dynamic_checkpoint": {"check_interval": 2}}
    config["rotate_on_demand"] = True  # the killed save would rotate the first one out, had it completed
    run = launch(processes=2, config=config, name="killed")
    pids = run.wait_for_ranks()
    run.wait_for_step(2)
    first = trigger_and_wait(run)
    assert first["event"] == "SaveCompleted", first

    (out / "axolotl_checkpoint.save").touch()
    # Polled every millisecond: the moments a save passes through are short.
    run.wait_for(staged_file(out, moment), f"a staging directory with {moment or 'anything'}", interval=0.001)
    if victim == "job":
        run.kill()
    else:
        os.kill(pids[0 if victim == "rank0" else 1], 9)
        code = run.wait_exit(timeout=120)  # the launcher notices, stops the other rank, and fails: no hang
        assert code != 0

    latest = latest_full(out)
    assert latest is not None
    if victim != "job":
        # One rank killed mid-save: its half-written save stays invisible, and the rank still alive saves the same
        # step on its own into a staging directory of its own (docs/crash.md), without rotating the first one out.
        assert staging_dirs(out), "the interrupted save's staging directory was made visible or removed"
        steps = [c.step for c in list_checkpoints(out)]
        assert len(steps) == 2 and steps[0] == first["step"], steps
        rescued = read_checkpoint(out / f"checkpoint-{steps[1]}").manifest
        assert rescued.reason == "rank_failure" and rescued.failure is not None, rescued
        assert rescued.failure["ranks"] == [0 if victim == "rank0" else 1], rescued.failure
        assert latest.step == steps[1]
    elif staging_dirs(out):
        # Killed mid-save: the half-written checkpoint is invisible and the first one is still the latest.
        assert [c.step for c in list_checkpoints(out)] == [first["step"]]
        assert latest.step == first["step"]
    else:
        # Only possible for the kill while committing: the rename won the race, so the new one is complete.
        assert victim == "job"
        assert latest.step > first["step"]
    killed_staging = staging_dirs(out)

    resumed = launch(
        processes=2,
        config={**config, "max_steps": latest.step + 2},
        extra_args=["--resume-from-checkpoint", "latest"],
        name="resumed",
    )
    assert resumed.wait_exit(timeout=180) == 0, resumed.log_tail()
    log = resumed.log()
    assert f"resumed from {latest.path} at step {latest.step}" in log
    for name in killed_staging:
        assert f"removed {out / name}, left by a save that was interrupted" in log
    assert staging_dirs(out) == []
    assert latest_full(out) == latest
