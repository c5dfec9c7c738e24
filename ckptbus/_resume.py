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

Pure and torch-free: the runtime decides with it on the ranks that verify,
``ckptbus verify`` could too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from ._errors import CheckpointError
from ._layout import CheckpointInfo, Unusable, read_checkpoint, scan_checkpoints
from ._verify import VerifyMode, VerifyReport, verify_checkpoint

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


def resolve(target: str, output_dir: str | os.PathLike[str], mode: VerifyMode) -> Resolution:
    """The checkpoint ``target`` (a path, ``latest`` or ``latest_or_fresh``) names, verified with ``mode``.

    Reads and digests files (``mode`` ``full``: one read of each candidate);
    runs no collective. Raises :class:`~ckptbus.CheckpointError` naming the
    checkpoint, the file and the cause.
    """
    if target in (LATEST, LATEST_OR_FRESH):
        return _latest(Path(output_dir), mode, fresh_ok=target == LATEST_OR_FRESH)
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


def _latest(output_dir: Path, mode: VerifyMode, *, fresh_ok: bool) -> Resolution:
    complete, unusable = scan_checkpoints(output_dir)
    full = [c for c in complete if c.manifest.kind == "full"]
    # Newest first; at one step a complete checkpoint and an unusable directory cannot both exist (one name).
    candidates: list[CheckpointInfo | Unusable] = sorted([*full, *unusable], key=_step, reverse=True)
    skipped: list[str] = []
    failed: list[str] = []
    for candidate in candidates:
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


def _step(candidate: CheckpointInfo | Unusable) -> int:
    return candidate.step


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
