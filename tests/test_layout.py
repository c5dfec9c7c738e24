"""Checkpoints on disk: staging, the manifest written last, listing only complete ones, commit, rotation."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from ckptbus import CheckpointError, checkpoint_path, latest_full, list_checkpoints, read_checkpoint
from ckptbus._layout import (
    MANIFEST_NAME,
    CheckpointInfo,
    Manifest,
    clean_leftovers,
    commit,
    discard,
    prepare_staging,
    rotate,
    rotation_victims,
    staging_path,
)


def fields(step: int, *, kind: str = "full", reason: str = "file", world_size: int = 2) -> dict[str, Any]:
    return {"step": step, "kind": kind, "reason": reason, "world_size": world_size}


def make_checkpoint(
    out: Path, step: int, *, kind: str = "full", reason: str = "file", content: bytes = b"weights"
) -> Path:
    """A complete checkpoint made the way the sink makes one: staging, files, commit."""
    staging = prepare_staging(out, step)
    (staging / "model.safetensors").write_bytes(content)
    (staging / "random_states_0.pkl").write_bytes(b"rng0")
    (staging / "random_states_1.pkl").write_bytes(b"rng1")
    (staging / "sub").mkdir()
    (staging / "sub" / "optimizer.bin").write_bytes(b"opt" * 10)
    final = checkpoint_path(out, step)
    commit(staging, final, fields(step, kind=kind, reason=reason))
    return final


def steps(out: Path) -> list[int]:
    return [c.step for c in list_checkpoints(out)]


# -- names ----------------------------------------------------------------------------


def test_staging_is_never_named_like_a_checkpoint(tmp_path: Path) -> None:
    staging = staging_path(tmp_path, 12)
    assert staging.parent == tmp_path
    assert staging.name == ".ckptbus-staging-checkpoint-12"
    assert not staging.name.startswith("checkpoint-")
    assert checkpoint_path(tmp_path, 12) == tmp_path / "checkpoint-12"


def test_prepare_staging_starts_empty(tmp_path: Path) -> None:
    staging = prepare_staging(tmp_path, 3)
    (staging / "half-written").write_bytes(b"x")
    assert prepare_staging(tmp_path, 3) == staging
    assert list(staging.iterdir()) == []
    assert steps(tmp_path) == [], "a staging directory is never listed"


# -- commit -------------------------------------------------------------------------------


def test_commit_writes_the_manifest_last_and_renames(tmp_path: Path) -> None:
    staging = prepare_staging(tmp_path, 5)
    (staging / "model.safetensors").write_bytes(b"12345")
    (staging / "nested").mkdir()
    (staging / "nested" / "x.bin").write_bytes(b"abc")
    final = checkpoint_path(tmp_path, 5)
    assert not final.exists(), "nothing is visible under the final name before the commit"

    manifest = commit(staging, final, {**fields(5), "labels": ["before eval"], "request_ids": ["file-1-1"]})

    assert not staging.exists()
    assert sorted(p.name for p in final.iterdir()) == [MANIFEST_NAME, "model.safetensors", "nested"]
    # Written last: it lists every other file with its size, and none is newer than it.
    assert manifest.files == {"model.safetensors": 5, "nested/x.bin": 3}
    assert manifest.bytes == 8
    manifest_mtime = (final / MANIFEST_NAME).stat().st_mtime_ns
    assert all(p.stat().st_mtime_ns <= manifest_mtime for p in final.rglob("*") if p.is_file())
    on_disk = json.loads((final / MANIFEST_NAME).read_text(encoding="utf-8"))
    for key in ("step", "kind", "reason", "created", "world_size"):
        assert key in on_disk
    assert (on_disk["step"], on_disk["kind"], on_disk["reason"], on_disk["world_size"]) == (5, "full", "file", 2)
    assert datetime.fromisoformat(on_disk["created"]).tzinfo is not None
    assert on_disk["labels"] == ["before eval"] and on_disk["request_ids"] == ["file-1-1"]
    assert read_checkpoint(final).manifest == manifest


def test_manifest_records_stall_and_write_seconds(tmp_path: Path) -> None:
    staging = prepare_staging(tmp_path, 6)
    (staging / "model.safetensors").write_bytes(b"1")
    timings = {"seconds": 1.5, "stall_seconds": 0.05, "write_seconds": 1.4}
    commit(staging, checkpoint_path(tmp_path, 6), {**fields(6), **timings})

    on_disk = json.loads((checkpoint_path(tmp_path, 6) / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert {k: on_disk[k] for k in timings} == timings
    assert read_checkpoint(checkpoint_path(tmp_path, 6)).manifest.stall_seconds == 0.05
    # Manifests written before these fields existed still parse (as 0.0).
    older = {k: v for k, v in on_disk.items() if k not in ("stall_seconds", "write_seconds")}
    assert (Manifest.from_dict(older).stall_seconds, Manifest.from_dict(older).write_seconds) == (0.0, 0.0)


def test_commit_replaces_a_checkpoint_of_the_same_step(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, 10, content=b"old")
    make_checkpoint(tmp_path, 10, content=b"newer", reason="socket")
    assert steps(tmp_path) == [10]
    info = read_checkpoint(checkpoint_path(tmp_path, 10))
    assert info.manifest.reason == "socket"
    assert (info.path / "model.safetensors").read_bytes() == b"newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10"], "the old one is gone, no trash left"


def test_commit_moves_a_foreign_directory_aside_and_keeps_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    foreign = checkpoint_path(tmp_path, 10)
    foreign.mkdir()
    (foreign / "pytorch_model.bin").write_bytes(b"somebody else's")
    make_checkpoint(tmp_path, 10)
    assert steps(tmp_path) == [10]
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("checkpoint-10.orphaned-")]
    assert len(kept) == 1
    assert (kept[0] / "pytorch_model.bin").read_bytes() == b"somebody else's"
    assert any("is not a complete ckptbus checkpoint; moved it to" in r.getMessage() for r in caplog.records)


def test_discard_removes_only_staging(tmp_path: Path) -> None:
    staging = prepare_staging(tmp_path, 4)
    (staging / "f").write_bytes(b"x")
    discard(staging)
    assert not staging.exists()
    final = make_checkpoint(tmp_path, 4)
    discard(final)  # not a staging directory: left alone
    assert steps(tmp_path) == [4]


# -- listing: complete checkpoints only ---------------------------------------------------------


def break_manifest(path: Path, text: str) -> None:
    (path / MANIFEST_NAME).write_text(text, encoding="utf-8")


def test_list_checkpoints_skips_everything_incomplete(tmp_path: Path) -> None:
    assert list_checkpoints(tmp_path / "missing") == []
    for step in range(1, 9):
        make_checkpoint(tmp_path, step)
    no_manifest = checkpoint_path(tmp_path, 1)
    (no_manifest / MANIFEST_NAME).unlink()
    break_manifest(checkpoint_path(tmp_path, 2), '{"step": 2, "kind": "full", "reas')
    (checkpoint_path(tmp_path, 3) / "random_states_1.pkl").unlink()  # a listed file is missing
    with open(checkpoint_path(tmp_path, 4) / "sub" / "optimizer.bin", "r+b") as fh:
        fh.truncate(5)  # a listed file is truncated
    manifest = json.loads((checkpoint_path(tmp_path, 5) / MANIFEST_NAME).read_text())
    del manifest["world_size"]  # a required field is missing
    break_manifest(checkpoint_path(tmp_path, 5), json.dumps(manifest))
    manifest["world_size"], manifest["step"] = 2, 99  # the manifest is of another step
    break_manifest(checkpoint_path(tmp_path, 6), json.dumps(manifest))
    manifest["step"], manifest["kind"] = 7, "optimizer"  # not a kind ckptbus writes
    break_manifest(checkpoint_path(tmp_path, 7), json.dumps(manifest))
    # Names that are not checkpoints.
    (tmp_path / "checkpoint-9").write_bytes(b"a file, not a directory")
    make_checkpoint(tmp_path, 11).rename(tmp_path / "checkpoint-11-copy")
    prepare_staging(tmp_path, 12)

    assert steps(tmp_path) == [8]
    assert latest_full(tmp_path) == read_checkpoint(checkpoint_path(tmp_path, 8))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("no-manifest", "has no ckptbus.json: it is not a complete ckptbus checkpoint"),
        ("bad-json", "ckptbus.json is not valid JSON"),
        ("not-object", "ckptbus.json: manifest is not a JSON object"),
        ("missing-file", "is incomplete: random_states_1.pkl is missing"),
        ("truncated", "is incomplete: model.safetensors has 2 bytes, the manifest says 7"),
        ("bad-kind", "manifest kind 'everything' is not one of ('full', 'weights')"),
    ],
)
def test_read_checkpoint_says_what_is_wrong(tmp_path: Path, damage: str, message: str) -> None:
    path = make_checkpoint(tmp_path, 3)
    if damage == "no-manifest":
        (path / MANIFEST_NAME).unlink()
    elif damage == "bad-json":
        break_manifest(path, "{")
    elif damage == "not-object":
        break_manifest(path, "[1, 2]")
    elif damage == "missing-file":
        (path / "random_states_1.pkl").unlink()
    elif damage == "truncated":
        (path / "model.safetensors").write_bytes(b"we")
    elif damage == "bad-kind":
        data = json.loads((path / MANIFEST_NAME).read_text())
        break_manifest(path, json.dumps({**data, "kind": "everything"}))
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_checkpoint(path)
    assert steps(tmp_path) == []


def test_read_checkpoint_of_a_path_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint-1 does not exist; `ckptbus list --output-dir DIR` shows"):
        read_checkpoint(tmp_path / "checkpoint-1")


def test_read_checkpoint_of_something_that_is_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "checkpoint-1").write_text("a file")
    with pytest.raises(CheckpointError, match="is not a directory"):
        read_checkpoint(tmp_path / "checkpoint-1")


def test_latest_full_skips_weights_checkpoints(tmp_path: Path) -> None:
    assert latest_full(tmp_path) is None
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 20, kind="weights")
    latest = latest_full(tmp_path)
    assert latest is not None and latest.step == 10
    make_checkpoint(tmp_path, 30)
    assert steps(tmp_path) == [10, 20, 30]  # sorted by step, not by name (checkpoint-100 < checkpoint-20)
    make_checkpoint(tmp_path, 100)
    assert steps(tmp_path) == [10, 20, 30, 100]
    latest = latest_full(tmp_path)
    assert latest is not None and latest.step == 100


# -- leftovers ----------------------------------------------------------------------------------


def test_clean_leftovers_removes_staging_and_trash_only(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, 5)
    staging = prepare_staging(tmp_path, 6)
    (staging / "half").write_bytes(b"x")
    trash = tmp_path / ".ckptbus-trash-checkpoint-1-123"
    (trash / "deep").mkdir(parents=True)
    orphan = tmp_path / "checkpoint-3.orphaned-1700000000"
    orphan.mkdir()
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    removed = clean_leftovers(tmp_path)
    assert sorted(p.name for p in removed) == sorted([staging.name, trash.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-3.orphaned-1700000000",
        "checkpoint-5",
        "metrics.jsonl",
    ]
    assert clean_leftovers(tmp_path) == []
    assert clean_leftovers(tmp_path / "missing") == []


# -- rotation -------------------------------------------------------------------------------------


def info(step: int, reason: str, kind: str = "full") -> CheckpointInfo:
    manifest = Manifest(step=step, kind=kind, reason=reason, created="2024-01-01T00:00:00+00:00", world_size=1)  # type: ignore[arg-type]
    return CheckpointInfo(Path(f"/out/checkpoint-{step}"), manifest)


def victim_steps(checkpoints: list[CheckpointInfo], limit: int | None) -> list[int]:
    return [c.step for c in rotation_victims(checkpoints, limit)]


def test_rotation_deletes_only_the_oldest_scheduled_checkpoints() -> None:
    ckpts = [info(10, "schedule"), info(15, "file"), info(20, "schedule"), info(25, "socket"), info(30, "schedule")]
    assert victim_steps(ckpts, None) == []
    assert victim_steps(ckpts, 5) == []
    assert victim_steps(ckpts, 2) == [10]
    assert victim_steps(ckpts, 1) == [10, 20]
    assert victim_steps(list(reversed(ckpts)), 1) == [10, 20], "order on input does not matter"


def test_rotation_keeps_on_demand_checkpoints_and_mixed_reasons() -> None:
    ckpts = [info(10, "schedule+file"), info(20, "signal:SIGTERM"), info(30, "schedule"), info(40, "schedule")]
    assert victim_steps(ckpts, 1) == [30]


def test_rotation_never_deletes_the_newest_full_checkpoint() -> None:
    # The newest scheduled full save is older than a weights-only save made on the schedule's path.
    ckpts = [info(10, "schedule"), info(20, "schedule"), info(30, "schedule", kind="weights")]
    assert victim_steps(ckpts, 1) == [10]
    only_weights_after = [info(10, "schedule"), info(20, "schedule", "weights"), info(30, "schedule", "weights")]
    assert victim_steps(only_weights_after, 1) == [20]


def test_rotate_deletes_on_disk_and_ignores_incomplete(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="ckptbus")
    for step, reason in [(10, "schedule"), (20, "file"), (30, "schedule"), (40, "schedule")]:
        make_checkpoint(tmp_path, step, reason=reason)
    incomplete = tmp_path / "checkpoint-5"
    incomplete.mkdir()
    deleted = rotate(tmp_path, 2)
    assert deleted == [checkpoint_path(tmp_path, 10)]
    assert steps(tmp_path) == [20, 30, 40]
    assert incomplete.exists(), "rotation only sees complete checkpoints"
    assert not any(p.name.startswith(".ckptbus-trash-") for p in tmp_path.iterdir())
    assert rotate(tmp_path, None) == []


def test_the_names_and_the_manifest_are_still_importable_from_the_layout() -> None:
    """They moved to ckptbus/_names.py and ckptbus/_manifest.py; plugins and tests import them from here."""
    from ckptbus import _config, _eventlog, _layout, _lock, _manifest, _names, _socket_path

    assert (_layout.Manifest, _layout.write_manifest) == (_manifest.Manifest, _manifest.write_manifest)
    assert (_layout.MANIFEST_FORMAT, _layout.SCHEDULED_REASON) == (_manifest.MANIFEST_FORMAT, "schedule")
    assert (_layout.CHECKPOINT_PREFIX, _layout.MANIFEST_NAME) == ("checkpoint-", "ckptbus.json")
    assert (_layout.STAGING_PREFIX, _layout.TRASH_PREFIX) == (".ckptbus-staging-", ".ckptbus-trash-")
    assert _eventlog.EVENT_LOG_NAME == "ckptbus-events.jsonl" and _lock.LOCK_NAME == "ckptbus.lock"
    assert (_socket_path.SOCKET_NAME, _socket_path.POINTER_NAME) == ("ckptbus.sock", "ckptbus.sock.path")
    assert _config.RESERVED_NAMES is _names.RESERVED_NAMES
    assert {
        "ckptbus.json",
        "ckptbus-events.jsonl",
        "metrics.jsonl",
        "ckptbus.sock",
        "ckptbus.sock.path",
        "ckptbus.lock",
    } == _names.RESERVED_NAMES
    assert _names.PROBE_PREFIX == ".ckptbus-probe-"
    assert all(p.startswith(_names.RESERVED_PREFIXES) for p in (_names.STAGING_PREFIX, _names.PROBE_PREFIX))


def test_write_manifest_marks_a_directory_complete_in_place(tmp_path: Path) -> None:
    """The manifest module on its own: the Trainer's checkpoints are completed where they were written."""
    from ckptbus._manifest import complete_digests, write_manifest

    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / MANIFEST_NAME).write_text("{}")  # an older manifest is never left to vouch for newer files
    manifest = write_manifest(tmp_path, fields(3), lambda: {"seconds": 1.5}, {"a.bin": "xxh3_128:given"})
    assert (manifest.step, manifest.files, manifest.seconds) == (3, {"a.bin": 3}, 1.5)
    assert manifest.digests == {"a.bin": "xxh3_128:given"}, "a digest taken while writing is kept, not recomputed"
    assert Manifest.from_dict(json.loads((tmp_path / MANIFEST_NAME).read_text())) == manifest
    assert not (tmp_path / (MANIFEST_NAME + ".tmp")).exists()
    read = complete_digests(tmp_path, ["a.bin"], {})
    assert read["a.bin"].startswith("xxh3_128:") and complete_digests(tmp_path, ["a.bin"], {}, read_back=False) == {}
