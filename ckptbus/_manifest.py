"""The manifest ``ckptbus.json``: what it holds, how it is parsed, and how it is written last.

A directory is marked complete by :func:`write_manifest`: every file in it
is fsynced, every file gets its size and content digest, and only then is
the manifest written (through a temporary file) and the directory fsynced.
Reading a checkpoint back, listing and rotating are the layout's
(``_layout``), which imports this module; this one imports only the names,
the digests, the fsync helpers, the events' kinds and the errors, never the
layout.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final

from ._contained import MANIFEST_TMP_NAME
from ._digest import digest_file
from ._errors import CheckpointError
from ._events import SAVE_KINDS, SaveKind
from ._fsync import fsync_path, fsync_tree
from ._names import MANIFEST_NAME

MANIFEST_FORMAT: Final = 1
"""The format number new manifests carry (``format``)."""

SCHEDULED_REASON: Final = "schedule"
"""The reason of a checkpoint the ``save_steps`` schedule asked for; every other reason is on demand."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """The contents of ``ckptbus.json``, written last into every complete checkpoint."""

    step: int
    kind: SaveKind
    reason: str
    """What asked for it; several reasons joined with ``+`` (e.g. ``schedule+file``)."""
    created: str
    """UTC time of the commit, ISO 8601."""
    world_size: int
    labels: list[str] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)
    """Every file of the checkpoint (path relative to it) and its size in bytes."""
    digests: dict[str, str] = field(default_factory=dict)
    """The content digest of every file (``xxh3_128:<hex>``, see ckptbus/_digest.py), taken as it was written;
    empty in checkpoints written before digests existed."""
    bytes: int = 0
    seconds: float = 0.0
    """Wall time from the agreement to the commit."""
    stall_seconds: float = 0.0
    """How long training was held by this save (the slowest rank): the whole save when it is synchronous, the
    snapshot into host memory with ``async_save``."""
    write_seconds: float = 0.0
    """Time to persist: from the start of writing the files to the commit, fsync included (the slowest rank)."""
    format: int = MANIFEST_FORMAT
    failure: dict[str, Any] | None = None
    """Only in a checkpoint the surviving ranks wrote after a failure: ``ranks`` (those that failed), ``how``
    (each one's line), ``survivors``, ``error`` (the exception, if one was raised), ``exact`` (whether every
    rank's RNG state is of this step, so a resume repeats an uninterrupted run exactly)."""

    @property
    def on_demand(self) -> bool:
        """True if anything other than the ``save_steps`` schedule asked for it."""
        return any(r != SCHEDULED_REASON for r in self.reason.split("+"))

    def to_json(self) -> str:
        """The manifest as written to disk: indented JSON, keys sorted, one newline at the end."""
        fields = asdict(self)
        if fields["failure"] is None:
            del fields["failure"]  # (only rescued checkpoints say it)
        return json.dumps(fields, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """Parse a manifest; raises :class:`CheckpointError` if a required field is missing or wrong."""
        if not isinstance(data, dict):
            raise CheckpointError("manifest is not a JSON object")
        try:
            manifest = cls(
                step=int(data["step"]),
                kind=data["kind"],
                reason=str(data["reason"]),
                created=str(data["created"]),
                world_size=int(data["world_size"]),
                labels=[str(x) for x in data.get("labels", [])],
                request_ids=[str(x) for x in data.get("request_ids", [])],
                files={str(k): int(v) for k, v in data.get("files", {}).items()},
                digests={str(k): str(v) for k, v in data.get("digests", {}).items()},
                bytes=int(data.get("bytes", 0)),
                seconds=float(data.get("seconds", 0.0)),
                stall_seconds=float(data.get("stall_seconds", 0.0)),
                write_seconds=float(data.get("write_seconds", 0.0)),
                format=int(data.get("format", MANIFEST_FORMAT)),
                failure=dict(data["failure"]) if data.get("failure") is not None else None,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"manifest field missing or malformed: {exc}") from None
        if manifest.kind not in SAVE_KINDS:
            raise CheckpointError(f"manifest kind {manifest.kind!r} is not one of {SAVE_KINDS}")
        return manifest


def write_manifest(
    directory: Path,
    manifest_fields: dict[str, Any],
    fields_after_fsync: Callable[[], dict[str, Any]] = dict,
    digests: dict[str, str] | None = None,
    *,
    read_back: bool = True,
) -> Manifest:
    """Mark ``directory`` complete: fsync every file in it, then write the manifest last (through a temporary
    file) and fsync the directory. A manifest already there is removed first, so the files written since are
    never called complete by an older one. ``fields_after_fsync`` gives more manifest fields once every file is
    fsynced (timings that must include the fsync). ``digests``: those taken as the files were written; a file
    without one is read back here (unless ``read_back`` is False: then it has no digest).

    Raises :class:`OSError` if a file cannot be fsynced or read back, or the manifest cannot be written; the
    directory then has no manifest, so it is not complete."""
    (directory / MANIFEST_NAME).unlink(missing_ok=True)
    tmp = directory / MANIFEST_TMP_NAME
    tmp.unlink(missing_ok=True)  # a leftover of an interrupted commit in place: never listed
    files = fsync_tree(directory)
    manifest = Manifest(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        files=files,
        bytes=sum(files.values()),
        # A file no rank digested as it wrote it (written by save_state under DeepSpeed or FSDP, or by the
        # Trainer) is read back once here.
        digests=complete_digests(directory, files, digests or {}, read_back=read_back),
        **manifest_fields,
        **fields_after_fsync(),
    )
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(manifest.to_json())
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(tmp, directory / MANIFEST_NAME)
    fsync_path(directory, directory=True)
    return manifest


def complete_digests(
    directory: Path, files: Collection[str], taken: dict[str, str], *, read_back: bool = True
) -> dict[str, str]:
    """The digest of every file in ``files`` (paths relative to ``directory``): the one in ``taken`` (computed
    as it was written) where there is one, else (``read_back``) the file read back now; without ``read_back`` a
    file missing from ``taken`` gets none. Raises :class:`OSError` if a file cannot be read back."""
    found = {name: taken[name] for name in files if name in taken}
    if read_back:
        found.update({name: digest_file(directory / name) for name in files if name not in taken})
    return found


__all__ = ["MANIFEST_FORMAT", "SCHEDULED_REASON", "Manifest", "complete_digests", "write_manifest"]
