"""Exact resume: a resumed run repeats the losses of an uninterrupted run bit for bit (CPU, dropout on).

Every test runs ``train.py`` for real with ``accelerate launch`` (1 or 2
ranks over gloo). The run that writes the checkpoints is itself an
uninterrupted run: it saves and goes on. The resumed runs save nothing, so
a save that disturbed the training state (RNG, optimizer) would show up as
a difference too.

Data: 64 sequences of 4 per rank give 8 optimizer steps per epoch with 2
ranks and 16 with 1, so the runs cross epoch boundaries within tens of
steps: resuming mid-epoch, exactly at an epoch's end, and in the middle of
the second epoch (where accelerate's ``skip_first_batches`` used to lose the
sampler's epoch) are all covered.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from runs import TrainingRun, read_jsonl

from ckptbus import checkpoint_path, latest_full, list_checkpoints, read_checkpoint
from ckptbus._layout import MANIFEST_NAME, commit, prepare_staging, staging_path

pytestmark = pytest.mark.slow

DATA = {"dataset_size": 64, "micro_batch_size": 4, "sequence_len": 16}
NO_TRIGGERS = {"enabled": False}

Launch = Callable[..., TrainingRun]


def losses(rows: list[dict[str, Any]]) -> dict[int, float]:
    return {int(r["step"]): float(r["loss"]) for r in rows}


def run_to_end(run: TrainingRun, timeout: float = 180.0) -> TrainingRun:
    code = run.wait_exit(timeout)
    assert code == 0, f"run exited with {code}\n{run.log_tail()}"
    return run


def resume_from(launch: Launch, tmp_path: Path, checkpoint: Path, *, processes: int, max_steps: int) -> TrainingRun:
    """A run that resumes from ``checkpoint`` into a fresh output_dir and trains to ``max_steps``, saving nothing."""
    out = tmp_path / f"resumed-from-{checkpoint.name}"
    run = launch(
        processes=processes,
        config={**DATA, "max_steps": max_steps, "output_dir": str(out), "dynamic_checkpoint": NO_TRIGGERS},
        extra_args=["--resume-from-checkpoint", str(checkpoint)],
        name=f"resume-{checkpoint.name}",
    )
    return run_to_end(run)


def assert_same_losses(reference: dict[int, float], resumed: dict[int, float], first: int, last: int) -> None:
    assert sorted(resumed) == list(range(first, last + 1)), "the resumed run must start right after the checkpoint"
    different = {s: (reference[s], resumed[s]) for s in resumed if resumed[s] != reference[s]}
    assert not different, f"losses differ after resuming (step: (uninterrupted, resumed)): {different}"


def scheduled_reference(save_steps: int, max_steps: int) -> dict[str, Any]:
    """The config of an uninterrupted run with scheduled checkpoints (``shared_run``: one run per session)."""
    return {**DATA, "max_steps": max_steps, "save_steps": save_steps, "dynamic_checkpoint": NO_TRIGGERS}


@pytest.mark.parametrize(
    ("processes", "save_steps", "max_steps", "resume_steps"),
    [
        # 8 steps per epoch: 4 mid-epoch, 8 the end of epoch 0, 12 mid second epoch.
        pytest.param(2, 4, 20, (4, 8, 12), id="2-ranks"),
        # 16 steps per epoch: 5 mid-epoch, 20 mid second epoch.
        pytest.param(1, 5, 24, (5, 20), id="1-rank"),
    ],
)
def test_resume_from_scheduled_checkpoint_repeats_the_losses(
    launch: Launch,
    shared_run: Launch,
    tmp_path: Path,
    processes: int,
    save_steps: int,
    max_steps: int,
    resume_steps: tuple[int, ...],
) -> None:
    reference = shared_run(processes=processes, config=scheduled_reference(save_steps, max_steps))
    ref_losses = losses(reference.metrics())
    assert sorted(ref_losses) == list(range(1, max_steps + 1))
    for step in resume_steps:
        ckpt = read_checkpoint(checkpoint_path(reference.output_dir, step))
        assert ckpt.manifest.kind == "full"
        assert ckpt.manifest.reason == "schedule"
        assert ckpt.manifest.world_size == processes
        resumed = resume_from(launch, tmp_path, ckpt.path, processes=processes, max_steps=max_steps)
        assert f"resumed from {ckpt.path} at step {step}" in resumed.log()
        assert_same_losses(ref_losses, losses(resumed.metrics()), step + 1, max_steps)


def test_resume_from_file_triggered_checkpoint_repeats_the_losses(launch: Launch, tmp_path: Path) -> None:
    max_steps = 40
    run = launch(
        processes=2, config={**DATA, "max_steps": max_steps, "dynamic_checkpoint": {"check_interval": 3}}, name="ref"
    )
    run.wait_for_step(2)
    (run.output_dir / "axolotl_checkpoint.save").touch()
    run_to_end(run)
    ckpts = list_checkpoints(run.output_dir)
    assert ckpts, f"the trigger file made no checkpoint\n{run.log_tail()}"
    ckpt = ckpts[0]
    assert ckpt.manifest.reason == "file"
    assert ckpt.step < max_steps, "the checkpoint must leave steps to compare"
    resumed = resume_from(launch, tmp_path, ckpt.path, processes=2, max_steps=max_steps)
    assert_same_losses(losses(run.metrics()), losses(resumed.metrics()), ckpt.step + 1, max_steps)


def test_latest_after_sigkill_resumes_the_newest_complete_checkpoint(launch: Launch, tmp_path: Path) -> None:
    """Kill the whole job (every process, SIGKILL) mid-run; ``latest`` in the same output_dir carries on exactly."""
    config = {**DATA, "max_steps": 100000, "save_steps": 6, "dynamic_checkpoint": NO_TRIGGERS}
    first = launch(processes=2, config=config, name="first")
    first.wait_for(lambda: len(list_checkpoints(first.output_dir)) >= 2, "two scheduled checkpoints")
    newest = latest_full(first.output_dir)
    assert newest is not None
    first.wait_for_step(newest.step + 4)
    first.kill()
    killed_rows = first.metrics()
    killed_at = int(killed_rows[-1]["step"])
    newest = latest_full(first.output_dir)
    assert newest is not None and newest.step < killed_at

    second = launch(
        processes=2,
        config={**config, "output_dir": str(first.output_dir)},
        extra_args=["--resume-from-checkpoint", "latest"],
        name="second",
    )
    second.wait_for(lambda: len(read_jsonl(first.output_dir / "metrics.jsonl")) >= len(killed_rows) + 8, "8 steps")
    second.kill()
    assert f"resumed from {newest.path} at step {newest.step}" in second.log()
    resumed_rows = second.metrics()[len(killed_rows) :]
    resumed = losses(resumed_rows)
    assert min(resumed) == newest.step + 1
    overlap = {s: resumed[s] for s in range(newest.step + 1, killed_at + 1)}
    assert_same_losses(losses(killed_rows), overlap, newest.step + 1, killed_at)


def copy_checkpoint(source: Path, out: Path, step: int, *, kind: str | None = None) -> Path:
    """Commit a copy of a real checkpoint's files at ``step`` through the layout's own commit (manifest last)."""
    info = read_checkpoint(source)
    staging = prepare_staging(out, step)
    for name in info.manifest.files:
        if kind == "weights" and name != "model.safetensors":
            continue
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / name, staging / name)
    final = checkpoint_path(out, step)
    commit(
        staging,
        final,
        {"step": step, "kind": kind or info.manifest.kind, "reason": "api", "world_size": info.manifest.world_size},
    )
    return final


def test_latest_takes_only_complete_full_checkpoints(launch: Launch, shared_run: Launch, tmp_path: Path) -> None:
    """Newer than the one full checkpoint: a weights-only one, an interrupted save (staging, even with its
    manifest), a directory without manifest, one with a truncated file. ``latest`` takes the full one and the
    start-up removes the staging leftover with a log line."""
    # The real checkpoint copied: step 5 of the 1-rank reference of the scheduled-resume test above.
    source = shared_run(processes=1, config=scheduled_reference(5, 24))
    real = checkpoint_path(source.output_dir, 5)
    out = tmp_path / "out-latest"
    full = copy_checkpoint(real, out, 5)
    copy_checkpoint(real, out, 10, kind="weights")
    # A save interrupted between the manifest and the rename: a staging directory with a valid manifest.
    interrupted = copy_checkpoint(real, out, 15)
    interrupted.rename(staging_path(out, 15))
    no_manifest = copy_checkpoint(real, out, 20)
    (no_manifest / MANIFEST_NAME).unlink()
    truncated = copy_checkpoint(real, out, 25)
    with open(truncated / "optimizer.bin", "r+b") as fh:
        fh.truncate(100)
    assert [c.step for c in list_checkpoints(out)] == [5, 10]

    run = run_to_end(
        launch(
            processes=1,
            config={**DATA, "max_steps": 7, "output_dir": str(out), "dynamic_checkpoint": NO_TRIGGERS},
            extra_args=["--resume-from-checkpoint", "latest"],
            name="latest",
        )
    )
    log = run.log()
    assert f"resumed from {full} at step 5" in log
    assert f"removed {staging_path(out, 15)}, left by a save that was interrupted" in log
    assert not staging_path(out, 15).exists()
    assert sorted(losses(run.metrics())) == [6, 7]
    assert no_manifest.exists() and truncated.exists(), "directories that are not ckptbus checkpoints are left alone"


@pytest.mark.parametrize("which", ["weights", "staging", "no-manifest"])
def test_naming_an_unusable_checkpoint_fails_clearly(launch: Launch, tmp_path: Path, which: str) -> None:
    """A weights-only checkpoint, a staging directory or a directory without manifest named directly: exit 2."""
    out = tmp_path / "out"
    staging = prepare_staging(out, 3)
    (staging / "model.safetensors").write_bytes(b"not really")
    final = checkpoint_path(out, 3)
    commit(staging, final, {"step": 3, "kind": "weights", "reason": "signal:SIGINT", "world_size": 1})
    target = {"weights": final, "staging": staging_path(out, 3), "no-manifest": out / "checkpoint-9"}[which]
    if which == "staging":
        final.rename(target)
    if which == "no-manifest":
        target.mkdir()
    run = launch(
        processes=1,
        launcher="python",
        config={**DATA, "max_steps": 4, "output_dir": str(out), "dynamic_checkpoint": NO_TRIGGERS},
        extra_args=["--resume-from-checkpoint", str(target)],
        name=which,
    )
    assert run.wait_exit() == 2, run.log_tail()
    expected = {
        "weights": "is a weights-only checkpoint",
        "staging": "is the leftover of a save that was interrupted",
        "no-manifest": f"has no {MANIFEST_NAME}: it is not a complete ckptbus checkpoint",
    }[which]
    assert expected in run.log(), run.log_tail()
    assert not (out / "metrics.jsonl").exists(), "nothing trained"


def test_latest_with_no_checkpoint_starts_fresh(launch: Launch, tmp_path: Path) -> None:
    run = run_to_end(
        launch(
            processes=1,
            launcher="python",
            config={**DATA, "max_steps": 3, "dynamic_checkpoint": NO_TRIGGERS},
            extra_args=["--resume-from-checkpoint", "latest"],
        )
    )
    assert "resume_from_checkpoint=latest: no complete full checkpoint in" in run.log()
    assert "starting fresh" in run.log()
    assert sorted(losses(run.metrics())) == [1, 2, 3]
