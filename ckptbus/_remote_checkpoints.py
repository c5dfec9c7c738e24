"""Checkpoints in object storage: what is complete there, upload, download, verification and rotation.

The same rule as on disk (ckptbus/_layout.py), in a bucket: a checkpoint is
``<prefix>/checkpoint-<step>/``, one object per file of the local checkpoint,
and the manifest ``ckptbus.json`` is written last, only if absent
(``If-None-Match: *``). A checkpoint there is *complete* iff its manifest
object parses and every object it lists exists with its recorded size
(:func:`scan_remote`); downloads and ``ckptbus verify`` compare every byte
with the recorded digests as well. Nothing else is ever taken for complete,
so an upload killed at any moment leaves at most objects without a manifest.

Torch-free; boto3 only through ckptbus/_object_store.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ._contained import MAX_MANIFEST_BYTES, name_problem
from ._errors import CheckpointError
from ._fsync import fsync_path, fsync_tree
from ._layout import CheckpointInfo, checkpoint_path, read_checkpoint
from ._manifest import Manifest
from ._names import CHECKPOINT_PREFIX, MANIFEST_NAME, STAGING_PREFIX
from ._object_store import ObjectStore, ObjectStoreError, Progress
from ._remote_url import RemoteDir, step_of_folder

logger = logging.getLogger("ckptbus")

DEFAULT_PARALLELISM: Final = 8


@dataclass(frozen=True, slots=True)
class RemoteCheckpoint:
    """A complete checkpoint in a bucket: its manifest, parsed, and the manifest's exact bytes."""

    remote: RemoteDir
    manifest: Manifest
    manifest_bytes: bytes

    @property
    def step(self) -> int:
        return self.manifest.step

    @property
    def url(self) -> str:
        return self.remote.checkpoint_url(self.step)


@dataclass(frozen=True, slots=True)
class RemoteUnusable:
    """A ``checkpoint-<step>/`` folder in a bucket that is not complete, and why. ``damaged``: it has a manifest
    (it was complete once, or someone wrote one); otherwise an upload that never finished."""

    url: str
    step: int
    why: str
    damaged: bool


def _parse_manifest(remote: RemoteDir, step: int, raw: bytes) -> Manifest:
    where = f"{remote.checkpoint_url(step)}/{MANIFEST_NAME}"
    if len(raw) > MAX_MANIFEST_BYTES:
        raise CheckpointError(f"{where} has more than {MAX_MANIFEST_BYTES} bytes, more than a manifest ever holds")
    try:
        manifest = Manifest.from_dict(json.loads(raw.decode("utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{where} is not a valid manifest: {exc}") from None
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    if manifest.step != step:
        raise CheckpointError(f"{where} says step {manifest.step}, its folder step {step}")
    for name in manifest.files:
        why = name_problem(name)
        if why is not None:
            raise CheckpointError(f"{where} lists {name!r}: {why}")
    return manifest


def scan_remote(store: ObjectStore) -> tuple[list[RemoteCheckpoint], list[RemoteUnusable]]:
    """Every ``checkpoint-<step>/`` folder below the store's prefix: the complete checkpoints and the others with
    why, each list oldest step first. One listing of the prefix and one read of each manifest. Raises
    :class:`ObjectStoreError` when the store cannot be listed."""
    remote = store.remote
    base = remote.key("")
    base = f"{base}/" if base else ""
    sizes = store.objects(base)
    steps: set[int] = set()
    for key in sizes:
        folder = key[len(base) :].split("/", 1)[0]
        step = step_of_folder(folder)
        if step is not None and "/" in key[len(base) :]:
            steps.add(step)
    complete: list[RemoteCheckpoint] = []
    unusable: list[RemoteUnusable] = []
    for step in sorted(steps):
        url = remote.checkpoint_url(step)
        if remote.manifest_key(step) not in sizes:
            unusable.append(
                RemoteUnusable(url, step, f"{url} has no {MANIFEST_NAME}: an upload that never completed", False)
            )
            continue
        raw = store.get(remote.manifest_key(step), limit=MAX_MANIFEST_BYTES)
        if raw is None:  # deleted since the listing (a rotation)
            continue
        try:
            manifest = _parse_manifest(remote, step, raw)
        except CheckpointError as exc:
            unusable.append(RemoteUnusable(url, step, str(exc), True))
            continue
        problem = _missing_object(remote, manifest, sizes)
        if problem is not None:
            unusable.append(RemoteUnusable(url, step, problem, True))
            continue
        complete.append(RemoteCheckpoint(remote, manifest, raw))
    return complete, unusable


def _missing_object(remote: RemoteDir, manifest: Manifest, sizes: dict[str, int]) -> str | None:
    for name, size in manifest.files.items():
        found = sizes.get(remote.checkpoint_key(manifest.step, name))
        url = f"{remote.checkpoint_url(manifest.step)}/{name}"
        if found is None:
            return f"{url} is missing (the manifest lists {size} bytes)"
        if found != size:
            return f"{url} has {found} bytes, the manifest says {size}"
    return None


def find_remote(store: ObjectStore, step: int) -> RemoteCheckpoint:
    """The complete checkpoint of ``step`` in the store. Raises :class:`CheckpointError` naming what is wrong."""
    complete, unusable = scan_remote(store)
    for checkpoint in complete:
        if checkpoint.step == step:
            return checkpoint
    for other in unusable:
        if other.step == step:
            raise CheckpointError(f"{other.url} is not a complete checkpoint: {other.why}")
    raise CheckpointError(
        f"{store.remote.checkpoint_url(step)} does not exist; `ckptbus list {store.remote.url}` shows the complete "
        "checkpoints there"
    )


# -- upload ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Uploaded:
    """One checkpoint made complete in the bucket: how many bytes crossed and how long it took."""

    url: str
    bytes: int
    seconds: float
    already: bool = False
    """It was complete there already, with this very manifest (nothing was sent)."""


def upload_checkpoint(store: ObjectStore, info: CheckpointInfo, progress: Progress | None = None) -> Uploaded:
    """Make the local checkpoint ``info`` complete in the store: every file in parallel (parts of large ones in
    parallel too), each checked against the manifest's size and digest as it is read, then the manifest with a
    conditional write. If the bucket holds another checkpoint of the same step, its manifest is deleted first, so
    it stops being complete before any of its objects is replaced. Raises :class:`ObjectStoreError` (a
    :class:`~ckptbus._object_store.DigestMismatch` for a local file that changed); the checkpoint is then not
    complete in the bucket."""
    started = time.perf_counter()
    remote, step = store.remote, info.step
    local_manifest = (info.path / MANIFEST_NAME).read_bytes()
    manifest_key = remote.manifest_key(step)
    there = store.get(manifest_key, limit=MAX_MANIFEST_BYTES)
    if there == local_manifest:
        return Uploaded(remote.checkpoint_url(step), 0, time.perf_counter() - started, already=True)
    if there is not None:
        logger.warning(
            "ckptbus: %s holds another checkpoint of step %d; replacing it", remote.checkpoint_url(step), step
        )
        store.delete([manifest_key])
    files = info.manifest.files
    digests = info.manifest.digests

    def one(name: str) -> None:
        store.upload(
            info.path / name,
            remote.checkpoint_key(step, name),
            name=name,
            size=files[name],
            digest=digests.get(name),
            progress=progress,
        )

    _in_parallel(one, list(files), store.parallelism)
    written = store.put_if_absent(manifest_key, local_manifest)
    # Someone wrote a manifest since we looked: ours (a retry whose first answer was lost) is fine.
    if not written and store.get(manifest_key, limit=MAX_MANIFEST_BYTES) != local_manifest:
        raise ObjectStoreError(
            f"{remote.checkpoint_url(step)}: another writer completed a different checkpoint of step {step} "
            "during this upload (two runs share this remote_dir?); left as it is",
            transient=False,
        )
    return Uploaded(remote.checkpoint_url(step), info.manifest.bytes, time.perf_counter() - started)


def _in_parallel(work: Callable[[str], None], names: list[str], parallelism: int) -> None:
    """Run ``work`` on every name, ``parallelism`` at a time (large files by size first); the first error is
    raised once every started one ended."""
    if len(names) <= 1:
        for name in names:
            work(name)
        return
    with ThreadPoolExecutor(max_workers=min(parallelism, len(names)), thread_name_prefix="ckptbus-transfer") as pool:
        futures = [pool.submit(work, name) for name in names]
        errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error


# -- download ------------------------------------------------------------------------------------------------


def download_checkpoint(
    store: ObjectStore,
    checkpoint: RemoteCheckpoint,
    output_dir: str | os.PathLike[str],
    progress: Progress | None = None,
) -> CheckpointInfo:
    """Download ``checkpoint`` into ``<output_dir>/checkpoint-<step>``: files in parallel into a staging directory,
    each checked against the manifest's size and digest as it arrives, then the manifest (its exact bytes), fsync,
    and one rename: a half download is never a complete local checkpoint. A local entry of that name that is not a
    checkpoint is moved aside (kept). Raises :class:`CheckpointError` naming the object for a missing or
    damaged one (the staging directory is removed), :class:`ObjectStoreError` for a failed request."""
    manifest = checkpoint.manifest
    remote, step = checkpoint.remote, checkpoint.step
    # A name of this process's own: ranks that resolve on their own (the Trainer callback before its ranks are
    # known) may download the same checkpoint at once; the first rename wins and the others use its copy.
    staging = (
        Path(output_dir) / f"{STAGING_PREFIX}{CHECKPOINT_PREFIX}{step}-download-{os.getpid()}-{threading.get_ident()}"
    )
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    lock = threading.Lock()
    made: set[Path] = set()

    def one(name: str) -> None:
        target = staging / name
        with lock:
            if target.parent not in made:
                target.parent.mkdir(parents=True, exist_ok=True)
                made.add(target.parent)
        url = f"{checkpoint.url}/{name}"
        size = manifest.files[name]
        try:
            with open(target, "wb") as fh:
                got = store.download(remote.checkpoint_key(step, name), fh, size=size, progress=progress)
        except ObjectStoreError as exc:
            if not exc.transient:
                raise CheckpointError(f"{url} cannot be downloaded: {exc}") from None
            raise
        expected = manifest.digests.get(name)
        if got.bytes != size:
            raise CheckpointError(f"{url} has {got.bytes} bytes, the manifest says {size}")
        if expected is not None and got.digest != expected:
            raise CheckpointError(f"{url} has content digest {got.digest}, the manifest records {expected}")

    try:
        _in_parallel(one, sorted(manifest.files, key=lambda n: -manifest.files[n]), store.parallelism)
        (staging / MANIFEST_NAME).write_bytes(checkpoint.manifest_bytes)
        fsync_tree(staging)
        fsync_path(staging, directory=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    final = checkpoint_path(output_dir, step)
    if _same_checkpoint(final, checkpoint):  # another process of this run downloaded it first
        shutil.rmtree(staging, ignore_errors=True)
        return read_checkpoint(final)
    if final.exists() or final.is_symlink():
        # Whatever is there did not pass (resume came here instead): kept aside, never deleted.
        aside = final.parent / f"{final.name}.orphaned-{time.time_ns()}"
        logger.warning("ckptbus: %s is replaced by %s; moved it to %s and kept it", final, checkpoint.url, aside)
        os.rename(final, aside)
    try:
        os.rename(staging, final)
    except OSError:
        if not _same_checkpoint(final, checkpoint):
            raise
        shutil.rmtree(staging, ignore_errors=True)  # renamed into place by another process meanwhile
    fsync_path(final.parent, directory=True)
    return read_checkpoint(final)


def _same_checkpoint(final: Path, checkpoint: RemoteCheckpoint) -> bool:
    """Whether ``final`` is a complete checkpoint with exactly ``checkpoint``'s manifest."""
    try:
        read_checkpoint(final)
        return (final / MANIFEST_NAME).read_bytes() == checkpoint.manifest_bytes
    except (CheckpointError, OSError):
        return False


# -- verification --------------------------------------------------------------------------------------------


class _Discard:
    """A file that keeps nothing: what verification downloads into."""

    def write(self, data: bytes) -> int:
        return len(data)


@dataclass(frozen=True, slots=True)
class RemoteReport:
    """What :func:`verify_remote` found: None ``problem`` when every object matched its size and digest."""

    url: str
    step: int
    files: int
    bytes_read: int
    seconds: float
    problem: str | None = None
    bad_file: str | None = None
    undigested: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify_remote(store: ObjectStore, checkpoint: RemoteCheckpoint, progress: Progress | None = None) -> RemoteReport:
    """Read every object ``checkpoint`` lists and compare its size and digest with the manifest (nothing is kept
    on disk). Never raises for what it finds; raises :class:`ObjectStoreError` for a request that failed for a
    transient reason (the store unreachable)."""
    started = time.perf_counter()
    manifest = checkpoint.manifest
    read = 0
    for name, size in manifest.files.items():
        url = f"{checkpoint.url}/{name}"
        try:
            got = store.download(
                checkpoint.remote.checkpoint_key(checkpoint.step, name), _Discard(), size=size, progress=progress
            )
        except ObjectStoreError as exc:
            if exc.transient:
                raise
            return _report(checkpoint, started, read, f"{url} cannot be read: {exc}", name)
        read += got.bytes
        expected = manifest.digests.get(name)
        if got.bytes != size:
            return _report(checkpoint, started, read, f"{url} has {got.bytes} bytes, the manifest says {size}", name)
        if expected is not None and got.digest != expected:
            why = f"{url} has content digest {got.digest}, the manifest records {expected}"
            return _report(checkpoint, started, read, why, name)
    undigested = tuple(n for n in manifest.files if n not in manifest.digests)
    return RemoteReport(
        checkpoint.url, checkpoint.step, len(manifest.files), read, time.perf_counter() - started, undigested=undigested
    )


def _report(checkpoint: RemoteCheckpoint, started: float, read: int, problem: str, name: str) -> RemoteReport:
    files = len(checkpoint.manifest.files)
    return RemoteReport(checkpoint.url, checkpoint.step, files, read, time.perf_counter() - started, problem, name)


# -- rotation ------------------------------------------------------------------------------------------------


def remote_victims(
    complete: list[RemoteCheckpoint], unusable: list[RemoteUnusable], keep: int | None
) -> tuple[list[RemoteCheckpoint], list[RemoteUnusable]]:
    """What rotation in the bucket deletes (pure): beyond the newest ``keep`` complete checkpoints, the older
    complete ones, never the newest full one; and folders of uploads that never completed, older than the newest
    complete checkpoint (an upload killed midway). Nothing without ``keep``."""
    if keep is None or not complete:
        return [], []
    ordered = sorted(complete, key=lambda c: c.step)
    full = [c for c in ordered if c.manifest.kind == "full"]
    protected = {full[-1].step} if full else set()
    excess = ordered[: max(0, len(ordered) - keep)]
    newest = ordered[-1].step
    leftovers = [u for u in unusable if not u.damaged and u.step < newest]
    return [c for c in excess if c.step not in protected], leftovers


def rotate_remote(store: ObjectStore, keep: int | None) -> list[str]:
    """Delete what :func:`remote_victims` names; return the URLs. Call only after the newest upload is complete.
    Each checkpoint's manifest goes first (it stops being complete at once), then its other objects."""
    complete, unusable = scan_remote(store)
    victims, leftovers = remote_victims(complete, unusable, keep)
    deleted: list[str] = []
    for step, url in [(c.step, c.url) for c in victims] + [(u.step, u.url) for u in leftovers]:
        folder = store.remote.checkpoint_key(step)
        manifest_key = store.remote.manifest_key(step)
        store.delete([manifest_key])
        store.delete([k for k in store.objects(folder) if k != manifest_key])
        deleted.append(url)
    return deleted


__all__ = [
    "DEFAULT_PARALLELISM",
    "RemoteCheckpoint",
    "RemoteReport",
    "RemoteUnusable",
    "Uploaded",
    "download_checkpoint",
    "find_remote",
    "remote_victims",
    "rotate_remote",
    "scan_remote",
    "upload_checkpoint",
    "verify_remote",
]
