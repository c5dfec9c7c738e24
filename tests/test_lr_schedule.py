"""train.py's learning-rate schedule counts optimizer steps, whatever the number of ranks.

Stepped the way accelerate steps a prepared scheduler by default (once per
process at each call), a 2-rank run would end its warm-up at half of
``warmup_steps`` and reach a rate of 0 at half of ``max_steps``. These runs
compare the rate logged in ``metrics.jsonl`` (``lr``) at every step: 1 rank,
2 ranks, and the 2-rank checkpoint resumed on 1 rank (``accelerator.load_state``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from runs import TWELVE_STEPS, TrainingRun

pytestmark = pytest.mark.slow

SCHEDULE: dict[str, Any] = TWELVE_STEPS  # the 2-rank run is tests/test_parallel_writers.py's synchronous one too
MAX_STEPS = SCHEDULE["max_steps"]
WARMUP_STEPS = SCHEDULE["warmup_steps"]
PEAK = SCHEDULE["learning_rate"]
SAVED_AT = SCHEDULE["save_steps"]
EXIT_TIMEOUT = 300.0  # a dozen steps; the rest is starting up, on two busy cores


def expected_lr(step: int) -> float:
    """The rate optimizer step ``step`` (from 1) trains with: a linear warm-up from 0, then a linear decay to 0."""
    done = step - 1
    if done < WARMUP_STEPS:
        return PEAK * done / WARMUP_STEPS
    return PEAK * (MAX_STEPS - done) / (MAX_STEPS - WARMUP_STEPS)


def lr_by_step(run: TrainingRun) -> dict[int, float]:
    assert run.wait_exit(EXIT_TIMEOUT) == 0, run.log_tail()
    return {int(row["step"]): float(row["lr"]) for row in run.metrics()}


def test_the_learning_rate_of_every_step_does_not_depend_on_the_number_of_ranks(
    tmp_path: Path, launch: Callable[..., TrainingRun], shared_run: Callable[..., TrainingRun]
) -> None:
    one = launch(processes=1, name="one", config={**SCHEDULE, "output_dir": str(tmp_path / "one")})
    two = shared_run(processes=2, config=SCHEDULE)  # finished when it returns
    on_one, on_two = lr_by_step(one), lr_by_step(two)
    assert on_one == pytest.approx({step: expected_lr(step) for step in range(1, MAX_STEPS + 1)}, rel=1e-9, abs=0)
    assert on_two == on_one

    # The scheduler's state in a checkpoint counts optimizer steps too: another number of ranks resumes it as is.
    resumed = launch(
        processes=1,
        name="resumed",
        config={
            **SCHEDULE,
            "output_dir": str(tmp_path / "resumed"),
            "resume_from_checkpoint": str(two.output_dir / f"checkpoint-{SAVED_AT}"),
        },
    )
    assert lr_by_step(resumed) == {step: lr for step, lr in on_two.items() if step > SAVED_AT}
