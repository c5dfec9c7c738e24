"""Which checkpoint a resume loads: a path, or ``latest``, verified before anything is loaded.

The rule (docs/resume.md):

- A path must name a complete full checkpoint that passes verification;
  anything else is a :class:`~ckptbus.CheckpointError` saying why.
- ``latest`` takes the newest complete full checkpoint that passes. Every
  newer one passed over is named with why (failed verification, damaged,
  never completed), and so is a newer weights-only checkpoint, which cannot
  resume training. A directory without any checkpoint-<step> is a fresh
  start. Checkpoints that exist where none passes are a refusal: progress is
  never lost quietly. ``latest_or_fresh`` starts fresh there instead.

With ``remote_dir`` (docs/remote.md), ``latest`` also considers the
complete checkpoints in the bucket and takes the newest of both places; one
taken from the bucket is downloaded into ``output_dir`` first (every object
checked against its digest as it arrives, committed by one rename), and an
explicit ``s3://.../checkpoint-<step>`` is downloaded the same way. A missing
or damaged object is a refusal naming it, as a damaged local file is.

Torch-free: the runtime decides with it on the ranks that verify,
``ckptbus verify`` could too.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from ._errors import CheckpointError, ConfigError
from ._layout import CheckpointInfo, Unusable, read_checkpoint, scan_checkpoints
from ._remote_url import RemoteDir, is_remote, parse_remote, parse_target
from ._verify import VerifyMode, VerifyReport, verify_checkpoint

if TYPE_CHECKING:
    from ._object_store import ObjectStore
    from ._remote_checkpoints import RemoteCheckpoint, RemoteUnusable

LATEST: Final = "latest"
LATEST_OR_FRESH: Final = "latest_or_fresh"
"""``latest``, but a fresh start (with a warning) when checkpoints exist and none passes verification."""


@dataclass(frozen=True, slots=True)
class Resolution:
    """What to resume from (``info`` None: start fresh), with what a log should say about the choice."""

    info: CheckpointInfo | None
    report: VerifyReport | None = None
    skipped: list[str] = field(default_factory=list)
    """Newer checkpoints passed over by ``latest``, each with why: a WARNING each."""
    notes: list[str] = field(default_factory=list)
    """What else the user should know about the choice (a newer weights-only checkpoint)."""


def resolve(
    target: str,
    output_dir: str | os.PathLike[str],
    mode: VerifyMode,
    *,
    remote: str | None = None,
    parallelism: int = 8,
) -> Resolution:
    """The checkpoint ``target`` (a path, ``latest``, ``latest_or_fresh`` or ``s3://.../checkpoint-<step>``) names,
    verified with ``mode``. ``remote``: the run's ``remote_dir``, which ``latest`` considers too; ``parallelism``:
    files (and parts) downloaded at once.

    Reads and digests files (``mode`` ``full``: one read of each candidate);
    downloads a checkpoint taken from a bucket into ``output_dir``; runs no
    collective. Raises :class:`~ckptbus.CheckpointError` naming the
    checkpoint, the file (or object) and the cause.
    """
    if is_remote(target):
        return _from_bucket(target, Path(output_dir), parallelism)
    if target in (LATEST, LATEST_OR_FRESH):
        bucket = parse_remote(remote) if remote is not None else None
        return _latest(
            Path(output_dir), mode, fresh_ok=target == LATEST_OR_FRESH, bucket=bucket, parallelism=parallelism
        )
    info = read_checkpoint(target)
    _check_full(info)
    report = verify_checkpoint(info, mode)
    if not report.ok:
        raise report.error()
    return Resolution(info, report)


def _check_full(info: CheckpointInfo) -> None:
    if info.manifest.kind != "full":
        raise CheckpointError(
            f"{info.path} is a weights-only checkpoint (model.safetensors, no optimizer or RNG state); it "
            "cannot resume training. Pick a full checkpoint (`ckptbus list --output-dir ...` shows the kinds) "
            "or load these weights with from_pretrained."
        )


def _latest(
    output_dir: Path, mode: VerifyMode, *, fresh_ok: bool, bucket: RemoteDir | None = None, parallelism: int = 8
) -> Resolution:
    complete, unusable = scan_checkpoints(output_dir)
    full = [c for c in complete if c.manifest.kind == "full"]
    # Newest first; at one step a complete checkpoint and an unusable directory cannot both exist (one name). A
    # checkpoint in the bucket comes after a local one of the same step: the local one is taken if it passes.
    candidates: list[CheckpointInfo | Unusable | RemoteCheckpoint | RemoteUnusable] = [*full, *unusable]
    store = _open_store(bucket, parallelism) if bucket is not None else None
    try:
        if store is not None:
            candidates += _bucket_candidates(store, {c.step for c in complete})
        candidates.sort(key=lambda c: (c.step, isinstance(c, (CheckpointInfo, Unusable))), reverse=True)
        return _first_passing(output_dir, mode, candidates, complete, store, fresh_ok=fresh_ok)
    finally:
        if store is not None:
            store.close()


def _first_passing(
    output_dir: Path,
    mode: VerifyMode,
    candidates: list[CheckpointInfo | Unusable | RemoteCheckpoint | RemoteUnusable],
    complete: list[CheckpointInfo],
    store: ObjectStore | None,
    *,
    fresh_ok: bool,
) -> Resolution:
    from ._remote_checkpoints import RemoteCheckpoint, RemoteUnusable

    skipped: list[str] = []
    failed: list[str] = []
    for candidate in candidates:
        if isinstance(candidate, RemoteUnusable):
            skipped.append(f"skipped {candidate.url}: {candidate.why}")
            if candidate.damaged:
                failed.append(f"{candidate.url}: {candidate.why}")
            continue
        if isinstance(candidate, RemoteCheckpoint):
            assert store is not None
            try:
                info, report, note = _download(store, candidate, output_dir)
            except _Unreachable:
                raise  # the store failed, not the checkpoint: never fall back to an older one quietly
            except CheckpointError as exc:
                skipped.append(f"skipped {candidate.url}: {exc}")
                failed.append(f"{candidate.url}: {exc}")
                continue
            return Resolution(info, report, skipped, [note, *_passed_over_weights(complete, info.step)])
        if isinstance(candidate, Unusable):
            why = _unusable_why(candidate)
            skipped.append(f"skipped {candidate.path}: {why}")
            if candidate.damaged:
                failed.append(f"{candidate.path.name}: {why}")
            continue
        report = verify_checkpoint(candidate, mode)
        if report.ok:
            return Resolution(candidate, report, skipped, _passed_over_weights(complete, candidate.step))
        skipped.append(f"skipped {candidate.path}: failed verification: {report.problem}")
        failed.append(f"{candidate.path.name}: {report.problem}")
    notes = _passed_over_weights(complete, -1)
    if failed and not fresh_ok:
        raise CheckpointError(
            f"resume_from_checkpoint={LATEST}: {output_dir} holds {len(failed)} checkpoint(s) and none passes "
            f"verification ({'; '.join(failed)}). Nothing was loaded and nothing trained. "
            f"`ckptbus verify --output-dir {output_dir}` checks each one. To start from step 0 anyway (the damaged "
            f"checkpoints stay where they are), set resume_from_checkpoint: {LATEST_OR_FRESH}"
        )
    if failed:
        skipped.append(
            f"resume_from_checkpoint={LATEST_OR_FRESH}: none of the {len(failed)} checkpoint(s) in {output_dir} "
            "passes verification; starting fresh from step 0"
        )
    return Resolution(None, None, skipped, notes)


class _Unreachable(CheckpointError):
    """A download failed for a reason of the store (unreachable, busy), not of the checkpoint."""


def _open_store(bucket: RemoteDir, parallelism: int) -> ObjectStore:
    from ._object_store import ObjectStore, ObjectStoreError

    try:
        return ObjectStore(bucket, parallelism=parallelism)
    except ImportError:
        raise CheckpointError(f"{bucket.url} needs boto3, which is not installed: pip install 'ckptbus[s3]'") from None
    except ObjectStoreError as exc:
        raise CheckpointError(f"cannot resume from {bucket.url}: {exc}") from None


def _bucket_candidates(store: ObjectStore, local_steps: set[int]) -> list[RemoteCheckpoint | RemoteUnusable]:
    """The bucket's full checkpoints and unusable folders; folders of uploads that never completed only where no
    local checkpoint of that step exists (after a kill mid-upload the local one is the one to take)."""
    from ._object_store import ObjectStoreError
    from ._remote_checkpoints import scan_remote

    try:
        complete, unusable = scan_remote(store)
    except ObjectStoreError as exc:
        raise CheckpointError(f"cannot list the checkpoints in {store.remote.url}: {exc}") from None
    return [
        *(c for c in complete if c.manifest.kind == "full"),
        *(u for u in unusable if u.damaged or u.step not in local_steps),
    ]


def _download(
    store: ObjectStore, checkpoint: RemoteCheckpoint, output_dir: Path
) -> tuple[CheckpointInfo, VerifyReport, str]:
    """Download ``checkpoint`` into ``output_dir``, verified as it arrives: the local checkpoint, its report, and a
    line for the log. Raises :class:`CheckpointError` naming the object that is missing or damaged."""
    from ._object_store import ObjectStoreError
    from ._remote_checkpoints import download_checkpoint

    started = time.perf_counter()
    try:
        info = download_checkpoint(store, checkpoint, output_dir)
    except ObjectStoreError as exc:
        raise _Unreachable(f"cannot download {checkpoint.url}: {exc}") from None
    seconds = time.perf_counter() - started
    files = info.manifest.files
    undigested = tuple(n for n in files if n not in info.manifest.digests)
    report = VerifyReport(
        path=info.path,
        mode="full",
        files=len(files),
        bytes_read=info.manifest.bytes,
        seconds=seconds,
        undigested=undigested,
    )
    note = (
        f"downloaded {checkpoint.url} into {info.path} ({len(files)} files, {info.manifest.bytes / 1e6:.1f} MB in "
        f"{seconds:.2f} s, every object checked against its digest as it arrived)"
    )
    return info, report, note


def _from_bucket(url: str, output_dir: Path, parallelism: int) -> Resolution:
    """An explicit ``s3://.../checkpoint-<step>``: downloaded into ``output_dir`` and verified as it arrives."""
    from ._remote_checkpoints import find_remote

    try:
        target = parse_target(url)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    if target.step is None:
        raise CheckpointError(
            f"{url} names no checkpoint: give s3://BUCKET/PREFIX/checkpoint-<step> (`ckptbus list {url}` shows them), "
            "or resume_from_checkpoint: latest with remote_dir set"
        )
    store = _open_store(target.remote, parallelism)
    try:
        from ._object_store import ObjectStoreError

        try:
            checkpoint = find_remote(store, target.step)
        except ObjectStoreError as exc:
            raise CheckpointError(f"cannot read {url}: {exc}") from None
        if checkpoint.manifest.kind != "full":
            raise CheckpointError(
                f"{url} is a weights-only checkpoint (model.safetensors, no optimizer or RNG state); it cannot resume "
                "training. Pick a full checkpoint (`ckptbus list` shows the kinds)."
            )
        info, report, note = _download(store, checkpoint, output_dir)
    finally:
        store.close()
    return Resolution(info, report, [], [note])


def _unusable_why(unusable: Unusable) -> str:
    if unusable.link:
        return unusable.why
    if unusable.damaged:
        return f"damaged since it was written: {unusable.why}"
    return f"{unusable.why} (a save that never completed, or a directory ckptbus did not write)"


def _passed_over_weights(complete: list[CheckpointInfo], chosen_step: int) -> list[str]:
    newer = [c for c in complete if c.manifest.kind == "weights" and c.step > chosen_step]
    if not newer:
        return []
    names = ", ".join(c.path.name for c in newer)
    return [
        f"passed over the newer weights-only checkpoint(s) {names}: they hold the model but no optimizer, "
        "scheduler or RNG state, so training cannot resume from them (from_pretrained loads the model alone)"
    ]


__all__ = ["LATEST", "LATEST_OR_FRESH", "Resolution", "resolve"]
