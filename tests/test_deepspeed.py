"""DeepSpeed ZeRO-2 and ZeRO-3: train.py on 2 CPU ranks over gloo, as ``accelerate launch --use_deepspeed`` runs it.

Each stage runs the scenario of tests/sharded_runs.py: trigger file and
``ckptbus request`` (full checkpoints in DeepSpeed's layout), Ctrl+C (a
weights checkpoint equal to DeepSpeed's own fp32 consolidation of the same
step, loadable with ``from_pretrained``), and a resume whose losses equal
the uninterrupted run's bit for bit. Both run with accelerate's default
``zero3_save_16bit_model: false``, under which ``save_model`` alone refuses
ZeRO-3's partitioned weights.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sharded_runs import ZERO3_GATHERED, Runs, assert_refused_without_a_gpu, on_demand_then_exact_resume, zero

# Looked up, not imported: importing DeepSpeed takes seconds, and collection runs for every pytest run.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed (make setup installs it)"
    ),
]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Runs]:
    runs = Runs(tmp_path)
    yield runs
    runs.close()


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_on_demand_checkpoints_and_exact_resume(start: Runs, tmp_path: Path, stage: int) -> None:
    first, _ = on_demand_then_exact_resume(start, zero(stage), tmp_path)
    # ZeRO-3's weights live in shards: the Ctrl+C save gathered them and said so, once (the main process logs).
    assert first.log().count(ZERO3_GATHERED) == (1 if stage == 3 else 0), first.log_tail()


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only where there is no GPU")
def test_deepspeed_without_a_gpu_is_refused_instead_of_trained_as_plain_ddp(start: Runs) -> None:
    assert_refused_without_a_gpu(start, zero(2, on_gpus=True), "DeepSpeed")
