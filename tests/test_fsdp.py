"""FSDP2, sharded and full state dict: train.py on 2 CPU ranks as ``accelerate launch --use_fsdp`` runs it.

accelerate has no FSDP without an accelerator device, so the ranks run
through the test-only shim of tests/fsdp_cpu_shim.py, which puts
accelerate's own FSDP2 path (``fully_shard``, its FSDP save and load) on
CPU ranks over gloo. Each state dict type runs the scenario of
tests/sharded_runs.py: trigger file and ``ckptbus request`` (full
checkpoints in accelerate's FSDP layout), Ctrl+C (a weights checkpoint equal
to the same step's full checkpoint, loadable with ``from_pretrained``), and
a resume whose losses equal the uninterrupted run's bit for bit. On GPUs,
tests/manual/sharded_gpu_check.py runs the same without the shim.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sharded_runs import Runs, assert_refused_without_a_gpu, fsdp, on_demand_then_exact_resume

pytestmark = pytest.mark.slow


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Runs]:
    runs = Runs(tmp_path)
    yield runs
    runs.close()


@pytest.mark.parametrize("state_dict_type", ["SHARDED_STATE_DICT", "FULL_STATE_DICT"])
def test_fsdp_on_demand_checkpoints_and_exact_resume(start: Runs, tmp_path: Path, state_dict_type: str) -> None:
    on_demand_then_exact_resume(start, fsdp(state_dict_type), tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only where there is no GPU")
def test_fsdp_without_a_gpu_is_refused_instead_of_trained_as_plain_ddp(start: Runs) -> None:
    assert_refused_without_a_gpu(start, fsdp("SHARDED_STATE_DICT", on_gpus=True), "FSDP")
