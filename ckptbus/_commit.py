"""How a checkpoint becomes visible: named commit strategies (orbax's ``TemporaryPath`` is the model).

A strategy names where a save writes (:attr:`directory`), where it ends
(:attr:`final`), and three steps, each run by the committer only (the main
process of its filesystem) on the training thread:

- :meth:`create`: before any rank writes;
- :meth:`finalize`: after every rank wrote: file modes set once (following
  the umask, whoever wrote the file), every file fsynced, the manifest
  written last; from then on ``final`` is a complete checkpoint;
- :meth:`discard`: after a failure anywhere: nothing stays that looks complete.

Two strategies today: :class:`RenameCommit` (ckptbus writes: a staging
directory renamed into place) and :class:`InPlaceCommit` (the Trainer
writes ``checkpoint-<step>`` itself; the manifest written last is what makes
it complete). A remote tier adds a third.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ._layout import checkpoint_path, commit, discard, prepare_staging, staging_path, withdraw
from ._manifest import Manifest, write_manifest
from ._modes import apply_umask_modes
from ._names import MANIFEST_NAME
from ._sink import SaveRecord

logger = logging.getLogger("ckptbus")

Timings = Callable[[], dict[str, Any]]
"""The manifest's time fields, asked for once every file is fsynced (so they include the fsync)."""


class CommitStrategy(Protocol):
    """How one save becomes visible. See the module docstring."""

    @property
    def directory(self) -> Path: ...

    @property
    def final(self) -> Path: ...

    def create(self) -> None: ...

    def finalize(
        self, record: SaveRecord, timings: Timings, digests: dict[str, str], *, read_back: bool
    ) -> Manifest: ...

    def discard(self) -> None: ...


class RenameCommit:
    """Write into ``.ckptbus-staging-<step>``; finalize fsyncs, writes the manifest last and renames it to
    ``checkpoint-<step>``. Until the rename nothing of the save is listed, resumed or rotated."""

    __slots__ = ("_output_dir", "_renamed", "_rescue", "_step", "directory", "final")

    def __init__(self, output_dir: str | os.PathLike[str], step: int, *, rescue: bool = False) -> None:
        self._output_dir, self._step, self._rescue = output_dir, step, rescue
        self.directory = staging_path(output_dir, step, rescue=rescue)
        self.final = checkpoint_path(output_dir, step)
        self._renamed = False

    def create(self) -> None:
        prepare_staging(self._output_dir, self._step, rescue=self._rescue)

    def finalize(self, record: SaveRecord, timings: Timings, digests: dict[str, str], *, read_back: bool) -> Manifest:
        apply_umask_modes(self.directory)  # one mode for every file, whoever wrote it; fsynced in commit()
        manifest = commit(self.directory, self.final, record.manifest_fields(), timings, digests, read_back=read_back)
        self._renamed = True
        return manifest

    def discard(self) -> None:
        discard(self.directory)
        if self._renamed:
            # Another machine's commit failed (one committer per machine): take this machine's copy back, so
            # that no machine keeps a checkpoint the others lack.
            try:
                withdraw(self.final)
            except OSError as exc:
                logger.warning("ckptbus: could not take back %s (%s); delete it by hand", self.final, exc)


class InPlaceCommit:
    """The framework writes ``checkpoint-<step>`` in place; the manifest, written last, makes it complete.

    :meth:`create` removes an older manifest of the same step before the
    framework rewrites the files, so it never calls the new files complete.
    """

    __slots__ = ("directory", "final")

    def __init__(self, output_dir: str | os.PathLike[str], step: int) -> None:
        self.final = self.directory = checkpoint_path(output_dir, step)

    def create(self) -> None:
        (self.final / MANIFEST_NAME).unlink(missing_ok=True)

    def finalize(self, record: SaveRecord, timings: Timings, digests: dict[str, str], *, read_back: bool) -> Manifest:
        apply_umask_modes(self.final)  # one mode for every file the framework wrote; fsynced below
        return write_manifest(self.final, record.manifest_fields(), timings, digests, read_back=read_back)

    def discard(self) -> None:
        (self.final / MANIFEST_NAME).unlink(missing_ok=True)
