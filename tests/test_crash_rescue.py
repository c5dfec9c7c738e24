"""A rank that dies or raises: the ranks still alive save the last completed step, and it resumes exactly.

Real launches of the product's train.py (``accelerate launch``, 2 and 3 CPU
ranks over gloo) with one failure injected into a rank's forward pass by
tests/scripts/failing_train.py: a ``RuntimeError`` as an OOM raises it,
SIGKILL as the OOM killer sends it, SIGSEGV as native code dies of it. The
launcher (torchrun) then tears the group down for real.

"Exactly" is checked the strongest way: every file of the rescued checkpoint
has the digest of the same file in a checkpoint of the same step that an
uninterrupted run saved the normal way (the shared run with checkpoints at 4
and 8), RNG states of every rank included; and one rescued checkpoint is
resumed, repeating the uninterrupted run's losses bit for bit.

The rescue protocol's breadth (a writer that dies mid-rescue, every rank
raising, ranks that cannot write alone, missing or stale copies) is tested in
process in tests/test_rescue_protocol.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from runs import CHECKPOINTS_AT_4_AND_8, REPO, TrainingRun, accelerate_launch, merge

from ckptbus import read_checkpoint

pytestmark = pytest.mark.slow

FAILING_TRAIN = REPO / "tests" / "scripts" / "failing_train.py"
# The reference's training without its schedule (the only checkpoint of a failing run is the rescued one), with
# ckptbus's defaults on, as users run it.
CRASHING = {
    **{k: v for k, v in CHECKPOINTS_AT_4_AND_8.items() if k != "save_steps"},
    "dynamic_checkpoint": {"enabled": True},
}
FAIL_AT = 5  # the forward pass of step 5 fails: step 4 is the last step every rank completed

Launch = Callable[..., TrainingRun]


@pytest.fixture
def failing_run(tmp_path: Path) -> Iterator[Callable[..., TrainingRun]]:
    """``failing_run(spec, processes=2)``: a finished run of train.py whose ranks failed as ``spec``
    (RANKS:STEP:HOW) says; it must end by itself, not with status 0. Killed at teardown if it did not."""
    runs: list[TrainingRun] = []

    def start(spec: str, *, processes: int = 2, config: dict[str, Any] | None = None) -> TrainingRun:
        cfg = merge(CRASHING, config or {})
        run = TrainingRun(tmp_path, processes=processes, config=cfg, name=f"fail-{spec.replace(':', '-')}")
        runs.append(run)
        launcher = accelerate_launch(FAILING_TRAIN, processes=processes)
        run.start([*launcher, "--fail", spec, "--config", str(run.config_path)])
        code = run.wait_exit(120.0)
        assert code != 0, f"a run whose rank failed must not exit 0\n{run.log_tail()}"
        return run

    yield start
    for run in runs:
        run.kill()


def rescued(run: TrainingRun, step: int = FAIL_AT - 1) -> dict[str, Any]:
    """The rescued checkpoint's manifest, after checking it is the only one and ``ckptbus verify`` passes."""
    names = sorted(p.name for p in run.output_dir.glob("checkpoint-*"))
    assert names == [f"checkpoint-{step}"], f"{names}\n{run.log_tail()}"
    path = run.output_dir / f"checkpoint-{step}"
    verify = subprocess.run(
        [sys.executable, "-m", "ckptbus.cli", "verify", str(path)], capture_output=True, text=True, timeout=120
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    return json.loads((path / "ckptbus.json").read_text())


def assert_same_files(rescued_dir: Path, reference_dir: Path) -> None:
    """Every file has the digest of the uninterrupted run's: model, optimizer, scheduler, every rank's RNG state."""
    ours, theirs = read_checkpoint(rescued_dir).manifest.digests, read_checkpoint(reference_dir).manifest.digests
    assert sorted(ours) == sorted(theirs)
    different = {name: (ours[name], theirs[name]) for name in ours if ours[name] != theirs[name]}
    assert not different, f"rescued files differ from an uninterrupted run's save of the same step: {different}"


@pytest.fixture
def reference(shared_run: Callable[..., TrainingRun]) -> TrainingRun:
    return shared_run(processes=2, config=CHECKPOINTS_AT_4_AND_8)


def test_a_rank_that_raises_leaves_its_last_step_saved_and_the_resume_repeats_the_losses(
    failing_run: Callable[..., TrainingRun], launch: Launch, reference: TrainingRun
) -> None:
    run = failing_run("1:5:raise")
    manifest = rescued(run)
    assert manifest["reason"] == "rank_failure"
    failure = manifest["failure"]
    assert failure["ranks"] == [1] and failure["survivors"] == [0] and failure["exact"] is True
    assert failure["error"].startswith("RuntimeError: CUDA out of memory (injected on rank 1")
    # Rank 0 waits in the gradients' all-reduce for rank 1, which is alive until it has saved: rank 1 writes.
    assert failure["written_by"] == 1
    assert "rank 1 saved a full checkpoint of step 4" in run.log(), run.log_tail()
    assert "RuntimeError: CUDA out of memory" in run.log(), "the traceback stays the user's"
    assert_same_files(run.output_dir / "checkpoint-4", reference.output_dir / "checkpoint-4")
    events = [e for e in run.events() if e.get("reasons") == ["rank_failure"]]
    assert [e["event"] for e in events] == ["SaveStarted", "SaveCompleted"], run.events()

    resumed = launch(
        processes=2,
        config={**CRASHING, "output_dir": str(run.workdir / "resumed"), "dynamic_checkpoint": {"enabled": False}},
        extra_args=["--resume-from-checkpoint", str(run.output_dir / "checkpoint-4")],
        name="resumed",
    ).start()
    assert resumed.wait_exit(180.0) == 0, resumed.log_tail()
    want = {r["step"]: r["loss"] for r in reference.metrics() if r["step"] > 4}
    got = {r["step"]: r["loss"] for r in resumed.metrics()}
    assert got == want, "the resumed run must repeat the uninterrupted run's losses bit for bit"


def test_the_committer_killed_by_sigkill_leaves_its_last_step_saved_by_the_survivor(
    failing_run: Callable[..., TrainingRun], reference: TrainingRun
) -> None:
    run = failing_run("0:5:kill")
    manifest = rescued(run)
    failure = manifest["failure"]
    assert manifest["reason"] == "rank_failure" and failure["ranks"] == [0] and failure["written_by"] == 1
    assert "gone without a word" in failure["how"]["0"]
    assert failure["exact"] is True
    # Rank 0's RNG state came from the copy it kept in shared memory at step 4.
    assert_same_files(run.output_dir / "checkpoint-4", reference.output_dir / "checkpoint-4")


def test_a_segfault_of_one_of_three_ranks_leaves_one_checkpoint_with_every_ranks_state(
    failing_run: Callable[..., TrainingRun],
) -> None:
    run = failing_run("2:5:segv", processes=3)
    manifest = rescued(run)
    failure = manifest["failure"]
    assert manifest["world_size"] == 3 and failure["ranks"] == [2] and failure["survivors"] == [0, 1]
    assert failure["written_by"] in (0, 1) and failure["exact"] is True
    assert {f"random_states_{r}.pkl" for r in range(3)} <= set(manifest["files"])
    lines = [line for line in run.log().splitlines() if "ckptbus: training failed" in line]
    assert len(lines) == 1, f"one line says what happened, from the rank that wrote: {lines}"
    assert "rank 2 (pid" in lines[0] and "checkpoint-4" in lines[0]


def test_a_crash_while_an_async_save_is_in_flight_drops_it_and_rescues_the_same_step_exactly(
    failing_run: Callable[..., TrainingRun], reference: TrainingRun
) -> None:
    """The asynchronous save of step 4 is still being written when rank 1 raises in step 5: it is never made
    visible, and the rescue writes step 4 into a staging directory of its own (the abandoned writer threads may
    still write into theirs)."""
    run = failing_run("1:5:raise", config={"save_steps": 4, "dynamic_checkpoint": {"async_save": True}})
    started = [e for e in run.events() if e["event"] == "SaveStarted"]
    assert [(e["step"], e["reasons"]) for e in started] == [(4, ["schedule"]), (4, ["rank_failure"])], run.events()
    manifest = rescued(run)
    assert manifest["reason"] == "rank_failure" and manifest["failure"]["exact"] is True
    assert_same_files(run.output_dir / "checkpoint-4", reference.output_dir / "checkpoint-4")
