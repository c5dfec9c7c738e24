"""A first end-to-end check: 2 ranks over gloo, the trigger file touched mid-run."""

from __future__ import annotations

import pytest

from ckptbus import list_checkpoints

pytestmark = pytest.mark.slow


def test_trigger_file_two_ranks(launch) -> None:
    run = launch(processes=2)
    run.wait_for_step(20)
    trigger = run.output_dir / "axolotl_checkpoint.save"
    touched_at = run.last_step()
    trigger.touch()
    ckpts = run.wait_for(lambda: list_checkpoints(run.output_dir), "a checkpoint")
    assert touched_at <= ckpts[0].step <= touched_at + 5 + 1
    assert len(run.worker_pids()) == 2
    assert not trigger.exists()
