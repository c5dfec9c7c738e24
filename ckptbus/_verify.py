"""Verification of a checkpoint against its manifest: every file there, with its size and its content digest.

:func:`verify_checkpoint` reads every file the manifest lists again and
compares its size and (``full``) its digest with what was recorded when it
was written; resume calls it before anything is loaded, and so does
``ckptbus verify``. It never raises for what it finds: the report says what
is wrong, and :meth:`VerifyReport.error` is the refusal to load.

This module imports no torch (the CLI uses it). It imports the hashing
(``_digest``) and the layout (``_layout``, for :class:`CheckpointInfo`);
neither imports it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from ._contained import Problem, check_listed, open_checkpoint_dir, open_listed, unlisted_problem
from ._digest import ALGORITHM, digest_fd
from ._errors import CheckpointError
from ._layout import CheckpointInfo

VerifyMode = Literal["full", "sizes", "off"]
"""How much resume checks: every file's digest and size (``full``), sizes only (``sizes``), nothing (``off``)."""

VERIFY_MODES: Final[tuple[VerifyMode, ...]] = ("full", "sizes", "off")


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyReport:
    """What :func:`verify_checkpoint` found in one checkpoint.

    ``problem`` is None when every checked file matched; otherwise it
    describes the first bad file (``bad_file``), with what the manifest
    recorded (``expected``) and what is on disk (``found``).
    """

    path: Path
    mode: VerifyMode
    files: int = 0
    """Files checked."""
    bytes_read: int = 0
    """Bytes read to compute digests (0 unless ``full``)."""
    seconds: float = 0.0
    undigested: tuple[str, ...] = ()
    """Files checked by size only because the manifest records no digest for them."""
    bad_file: str | None = None
    expected: str | None = None
    found: str | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def note(self) -> str | None:
        """Why the contents were not (all) compared, if they were not; None when every file's digest was."""
        if self.mode == "off":
            return "not verified (verify: off)"
        if self.mode == "sizes":
            return "sizes only (verify: sizes)"
        if self.undigested and len(self.undigested) == self.files:
            return "not verified: written before digests (sizes checked)"
        if self.undigested:
            return f"{len(self.undigested)} file(s) without a digest, checked by size: {', '.join(self.undigested)}"
        return None

    def summary(self) -> str:
        """One line for a log or the CLI: the outcome, what was checked and how long it took."""
        if not self.ok:
            return f"{self.path}: FAILED: {self.problem}"
        if self.mode == "off":
            return f"{self.path}: not verified (verify: off)"
        what = f"{self.files} files"
        if self.bytes_read:
            what += f", {self.bytes_read / 1e6:.1f} MB read, {ALGORITHM}"
        note = f"; {self.note}" if self.note else ""
        return f"{self.path}: ok ({what}, {self.seconds:.2f} s, verify: {self.mode}){note}"

    def error(self) -> CheckpointError:
        """The refusal to load this checkpoint, naming it, the file, expected and found, and what to do."""
        return CheckpointError(
            f"checkpoint {self.path} failed verification (dynamic_checkpoint.verify: {self.mode}): {self.problem}. "
            f"It was complete when written, so the file changed since (disk, copy or hand damage). Resume from "
            f"another checkpoint (`ckptbus verify --output-dir {self.path.parent}` checks them all); load it anyway "
            "only if you know why the file changed (dynamic_checkpoint.verify: off)"
        )


def verify_checkpoint(info: CheckpointInfo, mode: VerifyMode = "full") -> VerifyReport:
    """Check every file the manifest of ``info`` lists: it exists, has its size and (``full``) its digest.

    Never raises for what it finds: the first bad file is in the report
    (``report.error()`` is the refusal to raise). Every listed path is
    checked before it is opened (ckptbus/_contained.py: inside the
    checkpoint, no link on the way, a regular file, never blocking on a
    FIFO), and a file the manifest does not list is a failure too: a resume
    would load it unverified. Sizes are checked for every file before any
    content is read, so a truncated file is reported without reading
    gigabytes first. Files without a recorded digest (checkpoints written
    before digests existed) are checked by size, and the report's ``note``
    says so. Raises ValueError for an unknown ``mode``.
    """
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify mode {mode!r} is not one of {VERIFY_MODES}")
    started = time.perf_counter()
    files = info.manifest.files
    if mode == "off":
        return VerifyReport(path=info.path, mode=mode)
    digests: Mapping[str, str] = info.manifest.digests if mode == "full" else {}
    read = 0
    try:
        with open_checkpoint_dir(info.path) as root:
            bad = _first_bad_entry(root, files)
            if bad is None:
                bad, read = _first_bad_digest(root, files, digests)
    except CheckpointError as exc:
        bad = Problem(".", "a checkpoint directory", "refused", str(exc))
    undigested = tuple(name for name in files if name not in digests) if mode == "full" else ()
    return VerifyReport(
        path=info.path,
        mode=mode,
        files=len(files),
        bytes_read=read,
        seconds=time.perf_counter() - started,
        undigested=undigested,
        bad_file=bad.file if bad else None,
        expected=bad.expected if bad else None,
        found=bad.found if bad else None,
        problem=bad.why if bad else None,
    )


def _first_bad_entry(root: int, files: Mapping[str, int]) -> Problem | None:
    """The first listed file that is not a regular file of its size inside the checkpoint, else the first
    entry the manifest does not list."""
    for name, size in files.items():
        problem = check_listed(root, name, size)
        if problem is not None:
            return problem
    return unlisted_problem(root, dict(files))


def _first_bad_digest(root: int, files: Mapping[str, int], digests: Mapping[str, str]) -> tuple[Problem | None, int]:
    """The first file whose content does not match its recorded digest, and the bytes read until then."""
    read = 0
    for name, size in files.items():
        expected = digests.get(name)
        if expected is None:
            continue
        algorithm = expected.partition(":")[0]
        if algorithm != ALGORITHM:
            why = (
                f"{name}: the manifest records a {algorithm!r} digest, which this version of ckptbus does not "
                f"know (it computes {ALGORITHM}); upgrade ckptbus, or set dynamic_checkpoint.verify: sizes"
            )
            return Problem(name, expected, "unknown algorithm", why), read
        fd, problem = open_listed(root, name, size)  # checked again: the file may have changed since
        if problem is not None:
            return problem, read
        try:
            found, count = digest_fd(fd, size)
        except OSError as exc:
            return Problem(name, expected, exc.strerror or str(exc), f"{name} cannot be read: {exc.strerror}"), read
        finally:
            os.close(fd)
        read += count
        if count != size:
            why = f"{name} changed size while it was read ({count} bytes read, the manifest says {size})"
            return Problem(name, f"{size} bytes", f"{count} bytes", why), read
        if found != expected:
            why = f"{name} has content digest {found}, the manifest records {expected}"
            return Problem(name, expected, found, why), read
    return None, read


__all__ = ["VERIFY_MODES", "VerifyMode", "VerifyReport", "verify_checkpoint"]
