"""Resume loads only what was written: verification before loading, loud refusals, ``latest`` that loses nothing.

- The rule of ``latest`` (ckptbus/_resume.py) on checkpoint folders written
  here: newest passing checkpoint, newer ones skipped with why, a refusal
  when checkpoints exist and none passes, ``latest_or_fresh``.
- Load failures of a real ``accelerator.save_state`` checkpoint (damaged
  headers, unreadable pickles, an RNG state accelerate cannot set) in a real
  process (tests/scripts/load_damaged.py).
- Real 2-rank runs: the digests the save path records, a same-size flip in
  every kind of file caught, ``latest`` falling back to an older checkpoint
  and repeating the losses exactly, a damaged checkpoint named directly
  refused on every rank before training.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from runs import CHECKPOINTS_AT_4_AND_8, REPO, TrainingRun, run_ranks
from test_verify import flip, write_checkpoint

from ckptbus import CheckpointConfig, CheckpointError, ConfigError, DynamicCheckpointConfig, list_checkpoints
from ckptbus._config import build
from ckptbus._digest import digest_file, verify_checkpoint
from ckptbus._layout import MANIFEST_NAME, read_checkpoint
from ckptbus._resume import resolve

Launch = Callable[..., TrainingRun]


def truncate(path: Path, size: int = 3) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(size)


# -- the rule of latest -------------------------------------------------------------------------


def test_latest_takes_the_newest_checkpoint_that_passes_and_names_what_it_skipped(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, 10)
    write_checkpoint(tmp_path, 20)
    flip(write_checkpoint(tmp_path, 30) / "optimizer.bin")
    truncate(write_checkpoint(tmp_path, 40) / "scheduler.bin")
    (tmp_path / "checkpoint-50").mkdir()  # a save that never completed
    write_checkpoint(tmp_path, 60, kind="weights")
    resolution = resolve("latest", tmp_path, "full")
    assert resolution.info is not None and resolution.info.step == 20
    assert resolution.report is not None and resolution.report.ok
    skipped = "\n".join(resolution.skipped)
    assert f"skipped {tmp_path / 'checkpoint-50'}: {tmp_path / 'checkpoint-50'} has no {MANIFEST_NAME}" in skipped
    assert f"skipped {tmp_path / 'checkpoint-40'}: damaged since it was written:" in skipped
    assert "scheduler.bin has 3 bytes, the manifest says 100" in skipped
    assert f"skipped {tmp_path / 'checkpoint-30'}: failed verification: optimizer.bin has content digest" in skipped
    assert [line.split(":")[0] for line in resolution.skipped] == [
        f"skipped {tmp_path / f'checkpoint-{s}'}" for s in (50, 40, 30)
    ], "newest first, and nothing older than the one taken"
    assert len(resolution.notes) == 1 and "newer weights-only checkpoint(s) checkpoint-60" in resolution.notes[0]


def test_sizes_mode_takes_a_checkpoint_whose_bytes_changed(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, 10)
    flip(write_checkpoint(tmp_path, 20) / "model.safetensors")
    assert resolve("latest", tmp_path, "full").info.step == 10  # type: ignore[union-attr]
    assert resolve("latest", tmp_path, "sizes").info.step == 20  # type: ignore[union-attr]


def test_latest_refuses_when_checkpoints_exist_and_none_passes(tmp_path: Path) -> None:
    flip(write_checkpoint(tmp_path, 10) / "random_states_0.pkl")
    truncate(write_checkpoint(tmp_path, 20) / "model.safetensors")
    (tmp_path / "checkpoint-30").mkdir()
    with pytest.raises(CheckpointError) as refused:
        resolve("latest", tmp_path, "full")
    message = str(refused.value)
    assert f"resume_from_checkpoint=latest: {tmp_path} holds 2 checkpoint(s) and none passes verification" in message
    assert "checkpoint-20: damaged since it was written" in message
    assert "checkpoint-10: random_states_0.pkl has content digest" in message
    assert "Nothing was loaded and nothing trained" in message
    assert f"`ckptbus verify --output-dir {tmp_path}`" in message
    assert "resume_from_checkpoint: latest_or_fresh" in message

    fresh = resolve("latest_or_fresh", tmp_path, "full")
    assert fresh.info is None
    assert "none of the 2 checkpoint(s)" in fresh.skipped[-1] and "starting fresh from step 0" in fresh.skipped[-1]


def test_latest_starts_fresh_where_nothing_was_ever_complete(tmp_path: Path) -> None:
    assert resolve("latest", tmp_path / "missing", "full").info is None
    (tmp_path / "checkpoint-5").mkdir()  # a save that never completed holds no progress
    write_checkpoint(tmp_path, 8, kind="weights")
    resolution = resolve("latest", tmp_path, "full")
    assert resolution.info is None and len(resolution.skipped) == 1
    assert "newer weights-only checkpoint(s) checkpoint-8" in resolution.notes[0]


def test_a_path_is_verified_and_must_be_full(tmp_path: Path) -> None:
    good = write_checkpoint(tmp_path, 10)
    assert resolve(str(good), tmp_path, "full").info == read_checkpoint(good)
    flip(good / "sub/shard-00001.bin")
    with pytest.raises(CheckpointError, match=r"sub/shard-00001\.bin has content digest xxh3_128:[0-9a-f]{32}, the"):
        resolve(str(good), tmp_path, "full")
    assert resolve(str(good), tmp_path, "off").info is not None
    weights = write_checkpoint(tmp_path, 20, kind="weights")
    with pytest.raises(CheckpointError, match="is a weights-only checkpoint"):
        resolve(str(weights), tmp_path, "full")


def test_the_verify_key_is_checked() -> None:
    assert build(CheckpointConfig, {"output_dir": "o"}).dynamic_checkpoint.verify == "full"
    config = build(CheckpointConfig, {"output_dir": "o", "dynamic_checkpoint": {"verify": "sizes"}})
    assert config.dynamic_checkpoint.verify == "sizes"
    allowed = r"'dynamic_checkpoint\.verify': got 'fast'.*expected 'full' or 'sizes' or 'off'"
    with pytest.raises(ConfigError, match=allowed):
        build(CheckpointConfig, {"output_dir": "o", "dynamic_checkpoint": {"verify": "fast"}})


def runtime(out: Path, resume: str, verify: str = "full") -> Any:
    from ckptbus.plugins.runtime import Runtime
    from ckptbus.plugins.saving.trainer_sink import TrainerSink

    dyn = DynamicCheckpointConfig(verify=verify)  # type: ignore[arg-type]
    config = CheckpointConfig(output_dir=str(out), resume_from_checkpoint=resume, dynamic_checkpoint=dyn)
    return Runtime(config, TrainerSink())  # resolution only: the sink never writes here


def test_the_resume_log_says_what_was_skipped_and_how_long_verification_took(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_checkpoint(tmp_path, 10)
    flip(write_checkpoint(tmp_path, 20) / "model.safetensors")
    write_checkpoint(tmp_path, 30, kind="weights")
    info = runtime(tmp_path, "latest").resolve_resume()
    assert info is not None and info.step == 10
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("skipped" in w and "checkpoint-20: failed verification: model.safetensors" in w for w in warnings)
    assert any("passed over the newer weights-only checkpoint(s) checkpoint-30" in w for w in warnings)
    checked = [r.getMessage() for r in caplog.records if "checked before loading" in r.getMessage()]
    assert len(checked) == 1
    assert f"{tmp_path / 'checkpoint-10'}: ok (5 files" in checked[0]
    assert "xxh3_128" in checked[0] and " s, verify: full)" in checked[0]


def test_a_checkpoint_from_before_digests_resumes_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_checkpoint(tmp_path, 10, digests=False)
    assert runtime(tmp_path, "latest").resolve_resume() is not None
    notes = [r for r in caplog.records if "not verified: written before digests" in r.getMessage()]
    assert notes and notes[0].levelno == logging.WARNING


def test_latest_or_fresh_is_a_config_value(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    flip(write_checkpoint(tmp_path, 10) / "scheduler.bin")
    with pytest.raises(CheckpointError, match="none passes verification"):
        runtime(tmp_path, "latest").resolve_resume()
    assert runtime(tmp_path, "latest_or_fresh").resolve_resume() is None
    assert any("starting fresh from step 0" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


# -- the agreement between ranks (2 real ranks over gloo, no launcher) ------------------------------

RESUME_RANK = REPO / "tests" / "scripts" / "resume_rank.py"


def resume_ranks(tmp_path: Path, out: Path, target: str, fail_load_rank: int = -1) -> list[dict[str, Any]]:
    ranks = run_ranks(tmp_path, RESUME_RANK, str(out), target, str(fail_load_rank), name="resume", timeout=180)
    outputs = "\n".join(f"--- rank {r} (exit {rank.returncode}):\n{rank.output}" for r, rank in enumerate(ranks))
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    assert all(rank.result is not None for rank in ranks), outputs
    return [dict(rank.result) for rank in ranks if rank.result is not None]


@pytest.mark.slow
def test_one_rank_verifies_and_every_rank_refuses_with_its_words(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_checkpoint(out, 10)
    flip(write_checkpoint(out, 20) / "optimizer.bin")
    rank0, rank1 = resume_ranks(tmp_path, out, str(out / "checkpoint-20"))
    assert "optimizer.bin has content digest" in rank0["error"]
    assert rank1["error"] == rank0["error"], "rank 1 refuses with the words of the rank that verified"
    assert not [line for line in rank1["log"] if "checked before loading" in line], "one reader per filesystem"

    rank0, rank1 = resume_ranks(tmp_path, out, "latest")
    assert rank0["resolved"] == rank1["resolved"] == 10 and rank0["loaded"] == rank1["loaded"] == "ok"
    assert any("skipped" in line and "checkpoint-20" in line for line in rank0["log"] if line.startswith("WARNING"))
    assert [line for line in rank0["log"] if "checked before loading" in line]
    assert not [line for line in rank1["log"] if "skipped" in line or "checked before loading" in line]


@pytest.mark.slow
def test_a_load_that_failed_on_one_rank_stops_every_rank(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_checkpoint(out, 10)
    rank0, rank1 = resume_ranks(tmp_path, out, "latest", fail_load_rank=1)
    assert rank0["resolved"] == rank1["resolved"] == 10
    assert rank1["error"] == f"rank 1 could not load {out / 'checkpoint-10'}"
    assert rank0["error"] == rank1["error"] and "loaded" not in rank0


# -- load failures of a real accelerate checkpoint ---------------------------------------------------


@pytest.mark.slow
def test_every_load_failure_is_a_refusal_naming_the_file(tmp_path: Path) -> None:
    result = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "tests/scripts/load_damaged.py"), str(tmp_path), str(result)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results: dict[str, str] = json.loads(result.read_text())
    assert results.pop("intact") == "OK"
    expected = {
        "model-header-zeroed": ("model.safetensors does not load: SafetensorError: Error while deserializing header"),
        "model-all-zeros": "model.safetensors does not load: SafetensorError",
        "optimizer-zip-header-zeroed": "optimizer.bin does not load: UnpicklingError: the pickle inside is unreadable",
        "scheduler-all-zeros": "scheduler.bin does not load: ValueError: not the zip archive torch.save writes",
        "rng-overwritten-ff": "random_states_0.pkl (the RNG state of this rank) does not load: UnpicklingError",
        "rng-state-unusable": "accelerator.load_state did not restore the RNG state in random_states_0.pkl",
    }
    assert sorted(results) == sorted(expected)
    for case, words in expected.items():
        message = results[case]
        assert not message.startswith("RAW"), f"{case}: {message}"
        assert message.startswith(f"cannot resume from {tmp_path / case}: "), message
        assert words in message, f"{case}: {message}"
        assert "Weights only load failed" not in message, "the cause, not a page of advice"


# -- real runs ----------------------------------------------------------------------------------------

DATA = {"dataset_size": 64, "micro_batch_size": 4, "sequence_len": 16}
NO_TRIGGERS = {"enabled": False}


@pytest.fixture(scope="module")
def source(shared_run: Callable[..., TrainingRun]) -> TrainingRun:
    """A finished 2-rank run with full checkpoints at steps 4 and 8 and its losses (the reference); the same run
    as tests/test_hostile_checkpoints.py's, done once per session."""
    return shared_run(processes=2, config=CHECKPOINTS_AT_4_AND_8)


def copy_run(source: TrainingRun, out: Path) -> Path:
    out.mkdir(parents=True)
    for info in list_checkpoints(source.output_dir):
        shutil.copytree(info.path, out / info.path.name)
    return out


def losses(rows: list[dict[str, Any]]) -> dict[int, float]:
    return {int(r["step"]): float(r["loss"]) for r in rows}


@pytest.mark.slow
def test_real_checkpoints_record_a_digest_of_every_file(source: TrainingRun) -> None:
    checkpoints = list_checkpoints(source.output_dir)
    assert [c.step for c in checkpoints] == [4, 8]
    for info in checkpoints:
        manifest = info.manifest
        assert set(manifest.digests) == set(manifest.files), f"{info.path}: every file has a digest"
        for name, digest in manifest.digests.items():
            assert digest == digest_file(info.path / name), f"{info.path / name}: the digest is of the bytes on disk"


@pytest.mark.slow
def test_a_same_size_flip_in_every_kind_of_file_is_caught(source: TrainingRun, tmp_path: Path) -> None:
    real = read_checkpoint(source.output_dir / "checkpoint-8")
    kinds = {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "random_states_1.pkl"}
    assert kinds <= set(real.manifest.files), sorted(real.manifest.files)
    for name in sorted(real.manifest.files):
        copy = tmp_path / name.replace("/", "_") / "checkpoint-8"
        shutil.copytree(real.path, copy)
        size = (copy / name).stat().st_size
        flip(copy / name, offset=size // 2, count=min(64, size - size // 2))
        report = verify_checkpoint(read_checkpoint(copy), "full")
        assert report.bad_file == name and report.expected == real.manifest.digests[name], report


@pytest.mark.slow
def test_latest_falls_back_past_a_damaged_checkpoint_and_repeats_the_losses(
    source: TrainingRun, launch: Launch, tmp_path: Path
) -> None:
    out = copy_run(source, tmp_path / "out")
    flip(out / "checkpoint-8" / "random_states_1.pkl", offset=200, count=32)
    run = launch(
        processes=2,
        config={**DATA, "output_dir": str(out), "max_steps": 8, "save_steps": 4, "dynamic_checkpoint": NO_TRIGGERS},
        extra_args=["--resume-from-checkpoint", "latest"],
        name="fallback",
    )
    assert run.wait_exit(timeout=300) == 0, run.log_tail()
    log = run.log()
    assert "WARNING ckptbus: resume_from_checkpoint=latest: skipped" in log
    assert f"{out / 'checkpoint-8'}: failed verification: random_states_1.pkl has content digest" in log
    assert f"checked before loading: {out / 'checkpoint-4'}: ok" in log
    assert f"resumed from {out / 'checkpoint-4'} at step 4" in log
    resumed = losses(run.metrics())
    reference = losses(source.metrics())
    assert sorted(resumed) == [5, 6, 7, 8]
    assert {s: resumed[s] for s in resumed} == {s: reference[s] for s in resumed}, "exact resume from the older one"
    # The run saved step 8 again: the damaged checkpoint was replaced by a good one.
    assert verify_checkpoint(read_checkpoint(out / "checkpoint-8"), "full").ok


@pytest.mark.slow
def test_a_damaged_checkpoint_named_directly_is_refused_on_every_rank_before_training(
    source: TrainingRun, launch: Launch, tmp_path: Path
) -> None:
    out = copy_run(source, tmp_path / "out")
    flip(out / "checkpoint-8" / "optimizer.bin", offset=5000, count=4096)
    expected = read_checkpoint(out / "checkpoint-8").manifest.digests["optimizer.bin"]
    found = digest_file(out / "checkpoint-8" / "optimizer.bin")
    run = launch(
        processes=2,
        config={**DATA, "output_dir": str(out), "max_steps": 12, "dynamic_checkpoint": NO_TRIGGERS},
        extra_args=["--resume-from-checkpoint", str(out / "checkpoint-8")],
        name="refused",
    )
    assert run.wait_exit(timeout=300) == 1, run.log_tail()  # torchrun's status when a worker failed
    log = run.log()
    # The first rank to exit does so with status 2; torchrun may stop the other (SIGTERM) as it exits too.
    assert re.search(r"exitcode\s*: 2 ", log), log[-3000:]
    line = f"checkpoint {out / 'checkpoint-8'} failed verification (dynamic_checkpoint.verify: full): optimizer.bin"
    # Every rank raises with these words; the launcher may stop the slower one before its line is out.
    assert log.count(line) >= 1, run.log_tail()
    assert f"has content digest {found}, the manifest records {expected}" in log
    ranks_output = log.split("torch/distributed/elastic")[0]  # what follows is the launcher's own report
    assert "Traceback" not in ranks_output
    assert not (out / "metrics.jsonl").exists(), "nothing trained"


@pytest.mark.slow
def test_latest_refuses_to_start_over_when_no_checkpoint_passes(
    source: TrainingRun, launch: Launch, tmp_path: Path
) -> None:
    out = copy_run(source, tmp_path / "out")
    flip(out / "checkpoint-8" / "model.safetensors", offset=1000, count=64)
    truncate(out / "checkpoint-4" / "scheduler.bin")
    run = launch(
        processes=1,
        launcher="python",
        config={**DATA, "output_dir": str(out), "max_steps": 3, "dynamic_checkpoint": NO_TRIGGERS},
        extra_args=["--resume-from-checkpoint", "latest"],
        name="none-passes",
    )
    assert run.wait_exit(timeout=300) == 2, run.log_tail()
    assert f"{out} holds 2 checkpoint(s) and none passes verification" in run.log()
    assert "Traceback" not in run.log()
    assert not (out / "metrics.jsonl").exists(), "nothing trained"
