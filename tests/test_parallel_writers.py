"""Full saves written by every rank in parallel, each file digested as it is written.

The plan of writers is pure and checked directly; a real 2-rank run checks
that what the ranks wrote is complete, digested, and that every digest is of
the bytes on disk. (Exact resume from such checkpoints is checked by
tests/test_lifecycle_resume.py, and their files against ``save_state``'s by
tests/test_async_save.py.)
"""

from __future__ import annotations

from typing import Any

import pytest
from runs import TWELVE_STEPS, TrainingRun

from ckptbus import list_checkpoints
from ckptbus._digest import digest_file


def test_the_plan_balances_bytes_largest_first_and_is_the_same_everywhere() -> None:
    from ckptbus.plugins.saving.async_writer import plan_writers

    sizes = {"optimizer.bin": 340, "model.safetensors": 170, "scheduler.bin": 1, "sampler.bin": 1}
    plan = plan_writers(sizes, 2)
    assert plan == {"optimizer.bin": 0, "model.safetensors": 1, "sampler.bin": 1, "scheduler.bin": 1}
    assert plan_writers(dict(reversed(list(sizes.items()))), 2) == plan, "the order of the sizes does not matter"
    assert set(plan_writers(sizes, 1).values()) == {0}
    four = plan_writers({f"f{i}": 10 for i in range(8)}, 4)
    assert sorted(list(four.values()).count(r) for r in range(4)) == [2, 2, 2, 2]


@pytest.mark.slow
@pytest.mark.parametrize(
    "dyn",
    [{"async_save": False}, {"async_save": True}, {"async_save": True, "async_writer": "process"}],
    ids=["sync", "async-thread", "async-process"],
)
def test_every_file_of_a_full_save_is_digested_as_written(shared_run: Any, dyn: dict[str, Any]) -> None:
    # The synchronous run is tests/test_lr_schedule.py's 2-rank run: shared_run does it once for both.
    run: TrainingRun = shared_run(processes=2, config={**TWELVE_STEPS, "dynamic_checkpoint": dyn})
    checkpoints = list_checkpoints(run.output_dir)
    assert [c.step for c in checkpoints] == [6, 12], run.log_tail()
    for info in checkpoints:
        manifest = info.manifest
        assert set(manifest.digests) == set(manifest.files), manifest
        assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl"} <= set(
            manifest.files
        )
        for name, digest in manifest.digests.items():
            assert digest == digest_file(info.path / name), name
        assert not [p.name for p in info.path.iterdir() if p.name.startswith(".")], "nothing left beside the files"
