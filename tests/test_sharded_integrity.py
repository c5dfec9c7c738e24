"""Digests of the sharded files of DeepSpeed ZeRO-3 and FSDP2 (sharded state dict): recorded, checked, enforced.

tests/test_resume_integrity.py shows it for the replicated files of a DDP
run; here the files come from the engines themselves (DeepSpeed's
``save_checkpoint``, torch.distributed.checkpoint), written by every rank,
and ckptbus digests them after the fact. One real 2-rank run per engine, on
CPU ranks as in tests/test_deepspeed.py and tests/test_fsdp.py (FSDP through
the test-only shim), writes one full checkpoint that every test here reads
or copies:

- the manifest records a digest of every file on disk, each equal to the
  digest of its bytes, the shards and metadata included;
- a same-size flip in any one file of a copy (each shard, each
  ``.metadata``, ``latest``, the RNG states, the scheduler) is reported by
  ``verify_checkpoint`` with that file and its recorded digest;
- a resume from a copy with a flip in a shard that rank 1 wrote is refused
  by every rank, each logging the ``CheckpointError`` that names the
  checkpoint and the file, without a traceback, before anything is trained;
  train.py exits with status 2 (the slower rank may instead be stopped by
  torchrun, which ends the others once one has failed).

ZeRO-3 rather than ZeRO-2: each of its ranks writes a shard of the model as
well as of the optimizer state (ZeRO-2 keeps one whole-model file), and one
source run per engine keeps the module near a minute.

Damage is real: bytes inverted in place (``flip`` of tests/test_verify.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sharded_runs import Engine, Runs, assert_no_rank_traceback, fsdp, zero
from test_verify import flip

from ckptbus import CheckpointInfo, list_checkpoints, read_checkpoint
from ckptbus._digest import digest_file, verify_checkpoint
from ckptbus._layout import MANIFEST_NAME

pytestmark = pytest.mark.slow

# Looked up, not imported: importing DeepSpeed takes seconds, and collection runs for every pytest run.
NO_DEEPSPEED = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed (make setup installs it)"
)

DATA = {"dataset_size": 64, "micro_batch_size": 4, "sequence_len": 16}
STEP = 2
"""The step of the source run's one full checkpoint (and its max_steps)."""


@dataclass(frozen=True)
class Sharded:
    """An engine whose full checkpoints hold one file per rank, and a file of rank 1's to damage."""

    engine: Engine
    rank1_file: str


ENGINES = [
    pytest.param(
        Sharded(zero(3), "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt"), marks=NO_DEEPSPEED, id="zero3"
    ),
    pytest.param(Sharded(fsdp("SHARDED_STATE_DICT"), "pytorch_model_fsdp_0/__1_0.distcp"), id="fsdp-sharded"),
]


@dataclass(frozen=True)
class Source:
    sharded: Sharded
    checkpoint: CheckpointInfo


@pytest.fixture(scope="module", params=ENGINES)
def source(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    """A finished 2-rank run of the engine with one full checkpoint, at step ``STEP``, shared by the module."""
    sharded: Sharded = request.param
    runs = Runs(tmp_path_factory.mktemp(sharded.engine.name))
    try:
        config = {**DATA, "max_steps": STEP, "save_steps": STEP, "dynamic_checkpoint": {"enabled": False}}
        run = runs(sharded.engine, config=config, name="source")
        assert run.wait_exit(timeout=300) == 0, run.log_tail()
        [checkpoint] = list_checkpoints(run.output_dir)
        assert (checkpoint.step, checkpoint.manifest.kind, checkpoint.manifest.world_size) == (STEP, "full", 2)
        yield Source(sharded, checkpoint)
    finally:
        runs.close()


def files_on_disk(root: Path) -> set[str]:
    """Every file below ``root`` but the manifest, dot-files included (``.metadata``), relative to ``root``."""
    found = {str(Path(folder, name).relative_to(root)) for folder, _, names in os.walk(root) for name in names}
    return found - {MANIFEST_NAME}


def test_the_manifest_records_a_digest_of_every_file_the_engine_wrote(source: Source) -> None:
    checkpoint = source.checkpoint
    manifest = checkpoint.manifest
    on_disk = files_on_disk(checkpoint.path)
    # Every rank's shards, rank 1's included (the layout in sharded_runs names rank 0's files only, for FSDP).
    assert {*source.sharded.engine.full_files, source.sharded.rank1_file} <= on_disk, sorted(on_disk)
    assert set(manifest.files) == on_disk, "the manifest lists every file, in sub-folders too"
    assert set(manifest.digests) == on_disk, "every file has a digest"
    for name, digest in manifest.digests.items():
        assert digest == digest_file(checkpoint.path / name), f"{name}: the digest is of the bytes on disk"


def test_a_same_size_flip_in_every_file_is_caught(source: Source, tmp_path: Path) -> None:
    real = source.checkpoint
    for name in sorted(real.manifest.files):
        copy = tmp_path / name.replace("/", "_") / real.path.name
        shutil.copytree(real.path, copy)
        size = (copy / name).stat().st_size
        assert size > 0, name  # a flip needs a byte to change
        flip(copy / name, offset=size // 2, count=min(64, size - size // 2))
        assert (copy / name).stat().st_size == size
        report = verify_checkpoint(read_checkpoint(copy), "full")
        assert report.bad_file == name and report.expected == real.manifest.digests[name], report
        assert report.found == digest_file(copy / name), report


def test_a_flipped_shard_of_rank_1_is_refused_on_every_rank_before_training(source: Source, tmp_path: Path) -> None:
    engine = source.sharded.engine
    name = source.sharded.rank1_file
    out = tmp_path / "out"
    damaged = out / source.checkpoint.path.name
    shutil.copytree(source.checkpoint.path, damaged)
    size = (damaged / name).stat().st_size
    flip(damaged / name, offset=size // 2, count=64)
    expected = source.checkpoint.manifest.digests[name]
    found = digest_file(damaged / name)
    # torchrun looks at its ranks every monitor_interval seconds (0.1 by default) and stops the others (SIGTERM)
    # at the first failure it sees. The ranks log their refusal milliseconds apart but leave up to 1.4 s apart
    # (seen here): at 0.1 s the slower one was stopped in 2 runs of 3, at 5 s in 1 of 4. The longer interval
    # gives the report every rank's own status more often, for at most 5 s more of waiting; the checks below
    # hold either way.
    patient = dataclasses.replace(engine, launcher_args=(*engine.launcher_args, "--monitor_interval", "5"))
    runs = Runs(tmp_path)
    try:
        # Had it loaded, it would train to step 2 * STEP and save a checkpoint at every step.
        config: dict[str, Any] = {
            **DATA,
            "output_dir": str(out),
            "max_steps": 2 * STEP,
            "save_steps": 1,
            "dynamic_checkpoint": {"enabled": False},
        }
        run = runs(patient, config=config, name="refused", train_args=("--resume-from-checkpoint", str(damaged)))
        assert run.wait_exit(timeout=300) == 1, run.log_tail()  # torchrun's status when a worker failed
    finally:
        runs.close()
    log = run.log()
    # torchrun's report: a block per rank that did not exit 0, "rank : N (local_rank: N)" then "exitcode : S".
    # The first rank out exits with status 2; the other does too, unless torchrun stopped it first (-15), which
    # it does only once it has seen that first failure.
    statuses = dict(re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s+exitcode\s*: (-?\d+)", log))
    assert sorted(statuses) == ["0", "1"], log[-3000:]
    assert "2" in statuses.values() and set(statuses.values()) <= {"2", "-15"}, statuses
    line = (
        f"checkpoint {damaged} failed verification (dynamic_checkpoint.verify: full): {name} has content digest "
        f"{found}, the manifest records {expected}"
    )
    # Each rank refused (train.py logs the error and returns 2), rank 1 with the words of the rank that verified.
    assert log.count(line) == 2, run.log_tail()
    assert_no_rank_traceback(run)
    assert "Traceback" not in log.split("torch/distributed/elastic")[0], "what follows is the launcher's own report"
    assert not (out / "metrics.jsonl").exists(), "nothing trained"
    # No checkpoint of a later step, complete or staged; the damaged one is as it was.
    assert [p.name for p in out.iterdir() if "checkpoint-" in p.name] == [damaged.name]
    assert digest_file(damaged / name) == found
