"""Checkpoints on disk: where they live, atomic commit, listing, clean-up, rotation.

A checkpoint is written into ``<output_dir>/.ckptbus-staging-checkpoint-<step>``
and becomes ``<output_dir>/checkpoint-<step>`` by one ``rename`` after every
file in it was fsynced and the manifest ``ckptbus.json`` was written last. A
directory is a *complete* checkpoint only if its manifest parses and every
file the manifest lists is there with its recorded size; everything that
lists, resumes or rotates goes through :func:`list_checkpoints`, so nothing
half-written is ever used.

The names are ckptbus/_names.py's; the manifest and how it is written last
are ckptbus/_manifest.py's (imported here, and importable from here as
before). This module imports no torch: the CLI uses it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._contained import (
    Problem,
    check_listed,
    open_checkpoint_dir,
    read_manifest_text,
    symlink_refusal,
    unlisted_problem,
)
from ._errors import CheckpointError
from ._fsync import fsync_path, fsync_tree
from ._manifest import MANIFEST_FORMAT, SCHEDULED_REASON, Manifest, write_manifest
from ._names import CHECKPOINT_PREFIX, MANIFEST_NAME, RESCUE_STAGING_PREFIX, STAGING_PREFIX, TRASH_PREFIX

logger = logging.getLogger("ckptbus")

_CHECKPOINT_RE = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")


def checkpoint_path(output_dir: str | os.PathLike[str], step: int) -> Path:
    """``<output_dir>/checkpoint-<step>``: where a complete checkpoint lives."""
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"


def staging_path(output_dir: str | os.PathLike[str], step: int, *, rescue: bool = False) -> Path:
    """Where the checkpoint of ``step`` is written before it is complete (same filesystem, so rename is atomic);
    ``rescue``: the name a surviving rank writes into after a failure (ckptbus/_names.py)."""
    return Path(output_dir) / f"{RESCUE_STAGING_PREFIX if rescue else STAGING_PREFIX}{CHECKPOINT_PREFIX}{step}"


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """A complete checkpoint found on disk."""

    path: Path
    manifest: Manifest

    @property
    def step(self) -> int:
        return self.manifest.step


def read_checkpoint(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Validate the checkpoint at ``path``.

    Raises :class:`CheckpointError` saying why it is not a complete ckptbus
    checkpoint (no manifest, bad manifest, a listed file missing or truncated)
    or is refused (a symbolic link, a listed path outside it or not a regular
    file, a file its manifest does not list: :func:`read_checkpoint_files`).
    """
    p = Path(path)
    if p.name.startswith((STAGING_PREFIX, TRASH_PREFIX)):
        # A staging directory can hold a valid manifest for an instant before its rename: still not complete.
        raise CheckpointError(
            f"{p} is the leftover of a save that was interrupted or a checkpoint being deleted, not a complete "
            "checkpoint; pick a checkpoint-<step> directory (`ckptbus list --output-dir ...` shows them)"
        )
    return read_checkpoint_files(p)


def read_checkpoint_files(p: Path) -> CheckpointInfo:
    """Validate the manifest and files of the directory ``p``, whatever its name (ckptbus/_contained.py reads).

    Refuses (:class:`CheckpointError`, naming the file and why) a ``p`` that is a symbolic link, a manifest
    that is not a regular file or not valid, a ``checkpoint-<step>`` whose manifest is of another step, a
    listed path outside the checkpoint or through a link, a listed file that is not a regular file, missing or
    of another size, and any file the manifest does not list. Opens no listed file's contents."""
    with open_checkpoint_dir(p) as root:
        try:
            raw = read_manifest_text(root, p)
        except FileNotFoundError:
            raise CheckpointError(f"{p} has no {MANIFEST_NAME}: it is not a complete ckptbus checkpoint") from None
        try:
            manifest = Manifest.from_dict(json.loads(raw))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{p / MANIFEST_NAME} is not valid JSON: {exc}") from None
        except RecursionError:
            raise CheckpointError(f"{p / MANIFEST_NAME} is nested too deeply to be a manifest") from None
        except CheckpointError as exc:
            raise CheckpointError(f"{p / MANIFEST_NAME}: {exc}") from None
        named = _CHECKPOINT_RE.match(p.name)
        if named and int(named.group(1)) != manifest.step:
            raise CheckpointError(f"{p}: its manifest says step {manifest.step}, its name step {named.group(1)}")
        for name, size in manifest.files.items():
            problem = check_listed(root, name, size)
            if problem is not None:
                raise CheckpointError(_refusal(p, problem))
        problem = unlisted_problem(root, manifest.files)
        if problem is not None:
            raise CheckpointError(_refusal(p, problem))
    return CheckpointInfo(p, manifest)


def _refusal(p: Path, problem: Problem) -> str:
    return f"{p} is incomplete: {problem.why}" if problem.incomplete else f"{p} is refused: {problem.why}"


def was_complete(path: str | os.PathLike[str]) -> bool:
    """Whether the directory entry ``path``, not a complete checkpoint, is *damaged* rather than never
    completed: it holds a manifest (of any type), or it is a symbolic link (ckptbus never writes one, so
    something replaced the directory). Follows no link."""
    p = Path(path)
    return p.is_symlink() or os.path.lexists(p / MANIFEST_NAME)


@dataclass(frozen=True, slots=True)
class Unusable:
    """A ``checkpoint-<step>`` directory that is not a complete checkpoint, and why."""

    path: Path
    step: int
    why: str
    damaged: bool
    """True if it holds a manifest: it was complete once, so something changed it since (a file truncated or
    removed, the manifest edited). False: a save that never completed, or a directory ckptbus did not write."""
    link: bool = False
    """True if the entry is a symbolic link: listed as unusable, never followed (``damaged`` too, so ``latest``
    refuses rather than start over when nothing else passes)."""


def scan_checkpoints(output_dir: str | os.PathLike[str]) -> tuple[list[CheckpointInfo], list[Unusable]]:
    """Every ``checkpoint-<step>`` entry of ``output_dir``: the complete checkpoints and the others with why,
    each list oldest step first. Staging and trash directories are in neither. An entry that is a symbolic
    link, or not a directory, is unusable (a link is never followed: docs/integrity.md)."""
    root = Path(output_dir)
    found: list[CheckpointInfo] = []
    unusable: list[Unusable] = []
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return [], []
    for entry in entries:
        match = _CHECKPOINT_RE.match(entry.name)
        if not match:
            continue
        step = int(match.group(1))
        path = Path(entry.path)
        if entry.is_symlink():
            # Listed, never followed (docs/integrity.md): counted as damaged, so `latest` never starts over
            # quietly past a checkpoint a person linked in.
            unusable.append(Unusable(path, step, symlink_refusal(path), True, link=True))
            continue
        try:
            info = read_checkpoint(path)
        except CheckpointError as exc:
            unusable.append(Unusable(path, step, str(exc), was_complete(path)))
            continue
        found.append(info)
    found.sort(key=lambda c: c.step)
    unusable.sort(key=lambda u: u.step)
    return found, unusable


def list_checkpoints(output_dir: str | os.PathLike[str]) -> list[CheckpointInfo]:
    """Complete checkpoints in ``output_dir``, oldest step first. Incomplete ones are skipped."""
    found, unusable = scan_checkpoints(output_dir)
    for skipped in unusable:
        logger.debug("ckptbus: skipping %s: %s", skipped.path, skipped.why)
    return found


def latest_full(output_dir: str | os.PathLike[str]) -> CheckpointInfo | None:
    """The newest complete checkpoint of kind ``full``, or None."""
    full = [c for c in list_checkpoints(output_dir) if c.manifest.kind == "full"]
    return full[-1] if full else None


# --------------------------------------------------------------------------
# Writing.
# --------------------------------------------------------------------------


def prepare_staging(output_dir: str | os.PathLike[str], step: int, *, rescue: bool = False) -> Path:
    """Create an empty staging directory for ``step`` (removing a leftover of the same name)."""
    staging = staging_path(output_dir, step, rescue=rescue)
    if staging.is_symlink():
        staging.unlink()  # the link only, never what it points to
    elif staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def commit(
    staging: Path,
    final: Path,
    manifest_fields: dict[str, Any],
    fields_after_fsync: Callable[[], dict[str, Any]] = dict,
    digests: dict[str, str] | None = None,
    *,
    read_back: bool = True,
) -> Manifest:
    """Make ``staging`` the complete checkpoint ``final``: write its manifest last (:func:`write_manifest`),
    rename the directory and fsync the parent.

    If ``final`` already exists and is a complete ckptbus checkpoint it is
    replaced; anything else of that name (a directory ckptbus did not
    complete, a symbolic link, which is never followed) is moved aside to
    ``<final>.orphaned-<time>`` and kept.
    """
    manifest = write_manifest(staging, manifest_fields, fields_after_fsync, digests, read_back=read_back)
    trash: Path | None = None
    if final.exists() or final.is_symlink():
        try:
            read_checkpoint(final)
            trash = final.parent / f"{TRASH_PREFIX}{final.name}-{time.time_ns()}"
        except CheckpointError:
            trash = final.parent / f"{final.name}.orphaned-{time.time_ns()}"
            logger.warning(
                "ckptbus: %s exists but is not a complete ckptbus checkpoint; moved it to %s and kept it",
                final,
                trash,
            )
        os.rename(final, trash)
    os.rename(staging, final)
    fsync_path(final.parent, directory=True)
    if trash is not None and trash.name.startswith(TRASH_PREFIX):
        shutil.rmtree(trash, ignore_errors=True)
    return manifest


def discard(staging: Path) -> None:
    """Remove a staging directory after a failed save (never a complete checkpoint)."""
    if staging.name.startswith(STAGING_PREFIX):
        shutil.rmtree(staging, ignore_errors=True)


def clean_leftovers(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove staging and trash directories of interrupted saves; return what was removed.

    One exception: a trash directory that still holds a complete checkpoint
    whose name is free again was moved aside by a :func:`commit` that crashed
    before renaming its replacement into place. It is put back, so that step
    is not lost.
    """
    root = Path(output_dir)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not entry.name.startswith((STAGING_PREFIX, TRASH_PREFIX)):
            continue
        if entry.is_symlink():
            # A link moved to the trash by an earlier version (which followed it): remove the link, not its target.
            os.unlink(entry.path)
            removed.append(Path(entry.path))
            continue
        if not entry.is_dir(follow_symlinks=False):
            continue
        if entry.name.startswith(TRASH_PREFIX) and _restore_replaced(Path(entry.path)):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


def _restore_replaced(trash: Path) -> bool:
    """Rename ``trash`` back to its checkpoint name if it is complete and that name is free."""
    original, _, _ = trash.name[len(TRASH_PREFIX) :].rpartition("-")
    target = trash.parent / original
    if not _CHECKPOINT_RE.match(original) or target.exists():
        return False
    try:
        read_checkpoint_files(trash)
    except CheckpointError:
        return False
    os.rename(trash, target)
    logger.warning("ckptbus: restored %s, moved aside by a save that was interrupted", target)
    return True


def rotation_victims(
    checkpoints: Iterable[CheckpointInfo],
    limit: int | None,
    *,
    on_demand: bool = False,
    keep: Iterable[str | os.PathLike[str]] = (),
) -> list[CheckpointInfo]:
    """Which checkpoints ``save_total_limit`` deletes.

    The rule: only checkpoints made by the ``save_steps`` schedule count
    toward the limit and can be deleted, oldest step first; checkpoints asked
    for on demand (file, signal, socket, API) are kept, unless ``on_demand``
    (the config's ``rotate_on_demand``) makes them count like the others. The
    newest full checkpoint is never deleted, whatever its reason, and neither
    is any path in ``keep`` (the sink passes the checkpoint it just wrote:
    after resuming from an older step, that one need not have the highest step).
    """
    ordered = sorted(checkpoints, key=lambda c: c.step)
    if limit is None:
        return []
    full = [c for c in ordered if c.manifest.kind == "full"]
    protected = {Path(p) for p in keep}
    if full:
        protected.add(full[-1].path)
    counted = [c for c in ordered if on_demand or not c.manifest.on_demand]
    excess = counted[: max(0, len(counted) - limit)]
    return [c for c in excess if c.path not in protected]


def withdraw(path: Path) -> None:
    """Delete a complete checkpoint: rename it to a trash name (it stops being listed at once), then remove it.

    An interrupted removal leaves only a trash directory, which :func:`clean_leftovers` removes.
    """
    trash = path.parent / f"{TRASH_PREFIX}{path.name}-{time.time_ns()}"
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def rotate(
    output_dir: str | os.PathLike[str],
    limit: int | None,
    *,
    on_demand: bool = False,
    keep: Iterable[str | os.PathLike[str]] = (),
) -> list[Path]:
    """Delete the checkpoints :func:`rotation_victims` names (see it for the rule); return their paths.

    Call only after the newest checkpoint is complete. Each victim is
    withdrawn atomically (:func:`withdraw`). Raises :class:`OSError` if a
    rename fails; the checkpoints not yet reached are kept.
    """
    deleted: list[Path] = []
    for victim in rotation_victims(list_checkpoints(output_dir), limit, on_demand=on_demand, keep=keep):
        withdraw(victim.path)
        deleted.append(victim.path)
    return deleted


# The manifest (ckptbus/_manifest.py), fsync_tree (ckptbus/_fsync.py) and the reserved names (ckptbus/_names.py)
# were defined here once: plugins and tests still import them from the layout, so they stay importable here.
__all__ = [
    "CHECKPOINT_PREFIX",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "SCHEDULED_REASON",
    "STAGING_PREFIX",
    "TRASH_PREFIX",
    "CheckpointInfo",
    "Manifest",
    "Unusable",
    "checkpoint_path",
    "clean_leftovers",
    "commit",
    "discard",
    "fsync_tree",
    "latest_full",
    "list_checkpoints",
    "prepare_staging",
    "read_checkpoint",
    "read_checkpoint_files",
    "rotate",
    "rotation_victims",
    "scan_checkpoints",
    "staging_path",
    "withdraw",
    "write_manifest",
]
