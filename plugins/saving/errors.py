"""What a failed write means, in words a user acts on.

:func:`describe_write_error`: torch's zip writer reports a full disk as
``unexpected pos 576 vs 534`` or ``file write failed`` (its ``errno`` is lost
in C++), safetensors as ``I/O error: No space left on device (os error 28)``
inside its own error type. A save that failed for lack of room is named as
such, with the path, the bytes free on that filesystem and, where known, the
bytes the save needed; the same for a file-size limit (EFBIG) and a quota
(EDQUOT).

(One file mode for every file of a checkpoint is set at commit: ckptbus/_modes.py.)

Standard library only (no torch): it works on paths and exceptions.
"""

from __future__ import annotations

import errno
import os
import re
import resource
from pathlib import Path

_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# How torch's and safetensors' writers spell what they hide: the zip writer's position check, its write failure,
# and safetensors' "(os error N)" from Rust.
_TORCH_WRITE_FAILED = re.compile(r"unexpected pos \d+ vs \d+|file write failed|PytorchStreamWriter failed")
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")
_LOW_SPACE = 1 << 20
"""Below this many bytes free, a write that failed without an errno is taken for a full disk."""


def describe_write_error(
    exc: BaseException,
    path: str | os.PathLike[str],
    needed: int | None = None,
    *,
    free_before: int | None = None,
) -> str | None:
    """A message naming a full disk, a quota or a file-size limit behind ``exc`` (raised writing ``path``), or None.

    The message names the filesystem (its mount point and type) and, as the
    bytes free after the failure say little (the failed writes filled the
    disk), ``free_before``: the bytes free when the save began, if known.
    ``needed``: bytes the save was writing, if known. None means ``exc`` is
    not about room: report it as it is. Reads the free space of ``path``'s
    filesystem (its nearest existing folder: the staging folder may be gone
    already), the mount table and this process's file size limit; never raises.
    """
    code = _errno_of(exc)
    if code is None and _TORCH_WRITE_FAILED.search(str(exc)):
        code = _guess_errno(Path(path), needed)
    if code not in _SPACE:
        return None
    return _describe(code, Path(path), needed, exc, free_before)


def _errno_of(exc: BaseException) -> int | None:
    """The errno of ``exc`` or of an exception it was raised from; or the "(os error N)" in its text."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    match = _OS_ERROR_IN_TEXT.search(str(exc))
    return int(match.group(1)) if match else None


def _guess_errno(path: Path, needed: int | None) -> int | None:
    """For a write that failed without an errno: EFBIG if the file reached this process's size limit, ENOSPC if
    the filesystem has (almost) no room left, else None (a quota cannot be told apart from other failures)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY and _size(path) >= soft:
        return errno.EFBIG
    free = free_bytes(path)
    if free is not None and (free < _LOW_SPACE or (needed is not None and free < needed)):
        return errno.ENOSPC
    return None


def _describe(code: int, path: Path, needed: int | None, exc: BaseException, free_before: int | None) -> str:
    what = {
        errno.ENOSPC: "No space left on device",
        errno.EDQUOT: "Disk quota exceeded",
        errno.EFBIG: "File too large",
    }[code]
    free = free_bytes(path)
    mount = mount_of(path)
    facts = [f"filesystem {mount[0]} ({mount[1]})" if mount is not None else "filesystem unknown"]
    if free_before is not None:
        facts.append(f"{_human(free_before)} free when the save began")
    facts.append(f"{_human(free)} free now" if free is not None else "free space unknown")
    if needed is not None:
        facts.append(f"the save needed {_human(needed)}")
    if code == errno.EFBIG:
        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        if soft != resource.RLIM_INFINITY:
            facts.append(f"this process may write files of at most {_human(soft)} (ulimit -f)")
    advice = {
        errno.ENOSPC: "free space there (older checkpoints: save_total_limit) or use another output_dir",
        errno.EDQUOT: "raise the quota or free space in it (older checkpoints: save_total_limit)",
        errno.EFBIG: "raise the file size limit (ulimit -f) or use a filesystem that allows larger files",
    }[code]
    return f"{what} writing {path} ({', '.join(facts)}): {advice}. The writer said: {type(exc).__name__}: {exc}"


def free_bytes(path: str | os.PathLike[str]) -> int | None:
    """Bytes an unprivileged process may still write on the filesystem of ``path`` (or its nearest existing
    folder); None if none can be found."""
    probe = Path(path)
    for candidate in (probe, *probe.parents):
        try:
            stat = os.statvfs(candidate)
        except OSError:
            continue
        return stat.f_bavail * stat.f_frsize
    return None


def mount_of(path: str | os.PathLike[str]) -> tuple[str, str] | None:
    """(mount point, filesystem type) of ``path`` (or its nearest existing folder), from /proc/self/mounts; None
    where that cannot be read."""
    probe = Path(path)
    existing = next((p for p in (probe, *probe.parents) if p.exists()), None)
    if existing is None:
        return None
    target = os.path.realpath(existing)
    best: tuple[str, str] | None = None
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) < 3:
                    continue
                # The mount table escapes spaces and the like as octal (\040).
                point = fields[1].encode().decode("unicode_escape")
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and (best is None or len(point) >= len(best[0])):
                    best = (point, fields[2])
    except OSError:
        return None
    return best


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _human(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit} ({n} bytes)"
    return f"{n} bytes"


__all__ = ["describe_write_error", "free_bytes", "mount_of"]
