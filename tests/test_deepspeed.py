"""DeepSpeed ZeRO-2 and ZeRO-3: train.py on 2 CPU ranks over gloo, as ``accelerate launch --use_deepspeed`` runs it.

Each stage runs the scenario of tests/sharded_runs.py: trigger file and
``ckptbus request`` (full checkpoints in DeepSpeed's layout), Ctrl+C (a
weights checkpoint equal to DeepSpeed's own fp32 consolidation of the same
step, loadable with ``from_pretrained``), and a resume whose losses equal
the uninterrupted run's bit for bit. ZeRO-3 runs with accelerate's default
``zero3_save_16bit_model: false``, where ``save_model`` alone refuses.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sharded_runs import Engine, Runs, Start, deepspeed_weights, on_demand_then_exact_resume

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (make setup installs it)")

pytestmark = pytest.mark.slow

# What DeepSpeed writes for a full save with accelerate: its engine's checkpoint under the tag pytorch_model
# (the tag in `latest`), its consolidation scripts beside it, and accelerate's own files. ZeRO-2 keeps the whole
# model in one file; ZeRO-3 has each rank write its shard of the model too.
COMMON = ("latest", "zero_to_fp32.py", "random_states_0.pkl", "random_states_1.pkl", "scheduler.bin")
OPTIMIZER = tuple(f"pytorch_model/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1))
MODEL = {
    2: ("pytorch_model/mp_rank_00_model_states.pt",),
    3: tuple(f"pytorch_model/zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)),
}


def zero(stage: int) -> Engine:
    return Engine(
        name=f"zero{stage}",
        launcher_args=("--use_deepspeed", "--zero_stage", str(stage), "--zero3_save_16bit_model", "false"),
        cpu_ranks="deepspeed",
        full_files=COMMON + OPTIMIZER + MODEL[stage],
        consolidate=deepspeed_weights,
        env={"DS_ACCELERATOR": "cpu"},
    )


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Runs]:
    runs = Runs(tmp_path)
    yield runs
    runs.close()


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_on_demand_checkpoints_and_exact_resume(start: Start, tmp_path: Path, stage: int) -> None:
    first, _ = on_demand_then_exact_resume(start, zero(stage), tmp_path)
    gathered = first.log().count("the partitioned weights were gathered onto rank 0")
    # ZeRO-3's weights live in shards: the Ctrl+C save gathered them and said so, once (the main process logs).
    assert gathered == (1 if stage == 3 else 0), first.log_tail()
