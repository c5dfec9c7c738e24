"""FSDP2, sharded and full state dict: train.py on 2 CPU ranks as ``accelerate launch --use_fsdp`` runs it.

accelerate has no FSDP without an accelerator device, so the ranks run
through the test-only shim of tests/fsdp_cpu_shim.py, which puts
accelerate's own FSDP2 path (``fully_shard``, its FSDP save and load) on
CPU ranks over gloo. Each state dict type runs the scenario of
tests/sharded_runs.py: trigger file and ``ckptbus request`` (full
checkpoints in accelerate's FSDP layout), Ctrl+C (a weights checkpoint equal
to the same step's full checkpoint, loadable with ``from_pretrained``), and
a resume whose losses equal the uninterrupted run's bit for bit. On GPUs,
tests/manual/sharded_gpu_smoke.sh runs the same without the shim.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sharded_runs import Engine, Runs, Start, fsdp_full_weights, fsdp_sharded_weights, on_demand_then_exact_resume

pytestmark = pytest.mark.slow

COMMON = ("random_states_0.pkl", "random_states_1.pkl", "scheduler.bin")
# SHARDED_STATE_DICT: torch.distributed.checkpoint folders, one .distcp file per rank and a .metadata each.
SHARDED = tuple(f"{d}/{f}" for d in ("pytorch_model_fsdp_0", "optimizer_0") for f in (".metadata", "__0_0.distcp"))
# FULL_STATE_DICT: the whole model and optimizer state gathered onto the main process, one file each.
FULL = ("pytorch_model_fsdp.bin", "optimizer.bin")


def fsdp(state_dict_type: str) -> Engine:
    sharded = state_dict_type == "SHARDED_STATE_DICT"
    return Engine(
        name=state_dict_type.lower(),
        launcher_args=(
            "--use_fsdp",
            "--fsdp_version",
            "2",
            "--fsdp_state_dict_type",
            state_dict_type,
            "--fsdp_auto_wrap_policy",
            "TRANSFORMER_BASED_WRAP",
            "--fsdp_transformer_layer_cls_to_wrap",
            "GPT2Block",
        ),
        cpu_ranks="fsdp",
        full_files=COMMON + (SHARDED if sharded else FULL),
        consolidate=fsdp_sharded_weights if sharded else fsdp_full_weights,
    )


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Runs]:
    runs = Runs(tmp_path)
    yield runs
    runs.close()


@pytest.mark.parametrize("state_dict_type", ["SHARDED_STATE_DICT", "FULL_STATE_DICT"])
def test_fsdp_on_demand_checkpoints_and_exact_resume(start: Start, tmp_path: Path, state_dict_type: str) -> None:
    on_demand_then_exact_resume(start, fsdp(state_dict_type), tmp_path)
