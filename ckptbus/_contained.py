"""Reading a checkpoint only inside itself: every path a manifest lists is checked before it is opened.

A manifest is data on disk, and so is the tree it describes: either can be
edited by hand, damaged, or planted. Everything that reads a checkpoint
(listing, ``latest``, resume, ``ckptbus verify``) goes through here, so that:

- a listed name is a plain relative path (:func:`name_problem`): not
  absolute, no ``..``, ``.`` or empty part, not the manifest itself;
- it is opened below the checkpoint's own directory descriptor, one part at
  a time, every folder with ``O_NOFOLLOW | O_DIRECTORY`` and the file itself
  with ``O_NOFOLLOW | O_NONBLOCK`` after an ``lstat`` said it is a regular
  file (:func:`open_listed`): a symbolic link anywhere on the way, a FIFO, a
  socket or a device is a refusal that names it, never a read (a FIFO is
  never opened at all, so nothing blocks on one);
- ``fstat`` of what was opened says regular file and gives the size, which
  is compared with the manifest's before a byte is read;
- every entry of the tree that the manifest does not list is found
  (:func:`unlisted_entries`): ``accelerator.load_state`` reads files by their
  names (``optimizer.bin``, ``random_states_<rank>.pkl``, every
  ``custom_checkpoint_<n>.pkl``), so a file nobody verified would be loaded.
  The caller refuses the checkpoint (docs/integrity.md says why: refusing,
  not skipping). The manifest and its temporary file are ckptbus's own and
  never listed; folders are not files and are not listed either.

The checkpoint directory itself is opened with ``O_NOFOLLOW``
(:func:`open_checkpoint_dir`): a ``checkpoint-<step>`` that is a symbolic
link is refused with the path to pass instead (the rule in docs/integrity.md).

Standard library only; imports the names and the errors of ckptbus, nothing
else, so the layout, the manifest and the verification can all use it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ._errors import CheckpointError
from ._names import MANIFEST_NAME

MANIFEST_TMP_NAME: Final = MANIFEST_NAME + ".tmp"
"""The manifest's temporary file (written, fsynced, renamed to the manifest): never listed, never read back."""

OWN_NAMES: Final = frozenset({MANIFEST_NAME, MANIFEST_TMP_NAME})
"""Top-level names of a checkpoint that are ckptbus's own and never in its manifest's ``files``."""

MAX_MANIFEST_BYTES: Final = 256 << 20
"""A manifest larger than this is refused unread (a real one is about 200 bytes a file)."""

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_FILE_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


@dataclass(frozen=True, slots=True)
class Problem:
    """Why one listed (or unlisted) entry of a checkpoint is not read: the file, expected, found, in words."""

    file: str
    expected: str
    found: str
    why: str
    incomplete: bool = False
    """True for a listed file that is missing or of another size (what "incomplete" always meant); False for an
    entry that is refused (outside the checkpoint, not a regular file, not listed)."""


def describe(mode: int) -> str:
    """What an ``st_mode`` is, in words: ``regular file``, ``symbolic link``, ``FIFO``..."""
    for test, words in (
        (stat.S_ISREG, "regular file"),
        (stat.S_ISDIR, "folder"),
        (stat.S_ISLNK, "symbolic link"),
        (stat.S_ISFIFO, "FIFO (named pipe)"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return words
    return "special file"


def name_problem(name: str) -> str | None:
    """Why the manifest entry ``name`` is not a path ckptbus reads, or None if it is a plain relative path."""
    if not name:
        return "an empty file name"
    if "\0" in name:
        return "a file name with a NUL byte"
    if name.startswith("/"):
        return "an absolute path (a manifest lists paths inside its checkpoint only)"
    parts = name.split("/")
    if ".." in parts:
        return "a path that climbs out with '..' (a manifest lists paths inside its checkpoint only)"
    if "" in parts or "." in parts:
        return "not a plain relative path (an empty or '.' part)"
    if name in OWN_NAMES:
        return "ckptbus's own manifest file, which a manifest never lists"
    return None


@contextmanager
def open_checkpoint_dir(path: Path) -> Iterator[int]:
    """A descriptor of the checkpoint directory ``path``, opened without following a link.

    Raises :class:`CheckpointError` naming ``path`` if it does not exist, is
    a symbolic link (saying which path to pass instead) or is not a directory."""
    try:
        fd = os.open(path, _DIR_FLAGS)
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} does not exist; `ckptbus list --output-dir DIR` shows the complete checkpoints"
        ) from None
    except OSError as exc:
        if os.path.islink(path):
            raise CheckpointError(symlink_refusal(path)) from None
        if exc.errno == errno.ENOTDIR:
            raise CheckpointError(f"{path} is not a directory") from None
        raise CheckpointError(f"{path} cannot be opened: {exc.strerror}") from None
    try:
        yield fd
    finally:
        os.close(fd)


def symlink_refusal(path: Path) -> str:
    """The refusal of a checkpoint directory that is a symbolic link: the rule, and the path to pass instead."""
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    real = os.path.realpath(path)
    return (
        f"{path} is a symbolic link (to {target}); ckptbus never follows a link in place of a checkpoint "
        f"directory (it could lead outside the output directory, and rotation would delete only the link). "
        f"Pass the real path ({real}) to resume from or verify it, or replace the link with the directory"
    )


def open_listed(root_fd: int, name: str, size: int) -> tuple[int, Problem | None]:
    """Open the listed file ``name`` below the checkpoint directory ``root_fd``; check it is a regular file of
    ``size`` bytes. Returns (descriptor, None), or (-1, the problem); never blocks, never follows a link.
    The caller closes the descriptor."""
    expected = f"a regular file of {size} bytes"
    why = name_problem(name)
    if why is not None:
        return -1, Problem(name, expected, "refused", f"the manifest lists {name!r}: {why}")
    *folders, leaf = name.split("/")
    opened: list[int] = []
    try:
        parent = root_fd
        for i, folder in enumerate(folders):
            where = "/".join(folders[: i + 1])
            try:
                kind = describe(os.stat(folder, dir_fd=parent, follow_symlinks=False).st_mode)
            except FileNotFoundError:
                return -1, _missing(name, size)
            except OSError as exc:
                return -1, _unreadable(name, expected, exc)
            if kind != "folder":
                return -1, Problem(
                    name, expected, kind, f"{name}: {where} is a {kind}, not a folder inside the checkpoint"
                )
            try:
                parent = os.open(folder, _DIR_FLAGS, dir_fd=parent)
            except OSError as exc:
                return -1, _unreadable(name, expected, exc)
            opened.append(parent)
        try:
            kind = describe(os.stat(leaf, dir_fd=parent, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return -1, _missing(name, size)
        except OSError as exc:
            return -1, _unreadable(name, expected, exc)
        if kind != "regular file":
            return -1, _not_regular(name, expected, kind)
        try:
            fd = os.open(leaf, _FILE_FLAGS, dir_fd=parent)
        except OSError as exc:  # replaced between the lstat and the open (ELOOP: now a link)
            return -1, _unreadable(name, expected, exc)
    finally:
        for fd_ in opened:
            os.close(fd_)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return -1, _not_regular(name, expected, describe(st.st_mode))
    if st.st_size != size:
        os.close(fd)
        why = f"{name} has {st.st_size} bytes, the manifest says {size}"
        return -1, Problem(name, f"{size} bytes", f"{st.st_size} bytes", why, incomplete=True)
    return fd, None


def check_listed(root_fd: int, name: str, size: int) -> Problem | None:
    """:func:`open_listed`, closing the file at once: what a size check needs."""
    fd, problem = open_listed(root_fd, name, size)
    if fd >= 0:
        os.close(fd)
    return problem


def _missing(name: str, size: int) -> Problem:
    return Problem(name, f"{size} bytes", "no file", f"{name} is missing (the manifest lists {size} bytes)", True)


def _not_regular(name: str, expected: str, kind: str) -> Problem:
    return Problem(
        name, expected, kind, f"{name} is a {kind}, not a regular file inside the checkpoint; ckptbus does not read it"
    )


def unlisted_entries(root_fd: int, listed: set[str] | dict[str, int]) -> list[tuple[str, str]]:
    """Every entry below the checkpoint directory ``root_fd`` that is not a folder and not in ``listed``
    (ckptbus's own manifest files aside), as (relative path, what it is), sorted. Never follows a link."""
    found: list[tuple[str, str]] = []
    _walk(root_fd, "", listed, found)
    return sorted(found)


def _walk(dir_fd: int, prefix: str, listed: set[str] | dict[str, int], found: list[tuple[str, str]]) -> None:
    with os.scandir(dir_fd) as entries:
        children = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
    for child, is_dir in children:
        rel = prefix + child
        if is_dir:
            try:
                fd = os.open(child, _DIR_FLAGS, dir_fd=dir_fd)
            except OSError as exc:
                found.append((rel, f"folder that cannot be opened ({exc.strerror})"))
                continue
            try:
                _walk(fd, rel + "/", listed, found)
            finally:
                os.close(fd)
        elif rel not in listed and rel not in OWN_NAMES:
            try:
                kind = describe(os.stat(child, dir_fd=dir_fd, follow_symlinks=False).st_mode)
            except OSError:
                continue  # gone since the listing
            found.append((rel, kind))


def unlisted_problem(root_fd: int, listed: set[str] | dict[str, int]) -> Problem | None:
    """The refusal of a checkpoint holding entries its manifest does not list (the first named), or None."""
    extra = unlisted_entries(root_fd, listed)
    if not extra:
        return None
    name, kind = extra[0]
    more = f" (and {len(extra) - 1} more: {', '.join(n for n, _ in extra[1:4])}{'...' if len(extra) > 4 else ''})"
    why = (
        f"{name} ({kind}) is not in the manifest{more if len(extra) > 1 else ''}: it was added after the checkpoint "
        "was written, and a resume would load it unverified (accelerate reads files by name); remove it, or "
        "resume from another checkpoint"
    )
    return Problem(name, "no such file (not in the manifest)", kind, why)


def read_manifest_text(root_fd: int, path: Path) -> str:
    """The text of the manifest of the checkpoint ``root_fd`` (at ``path``, for messages): a regular file, not
    a link, read without blocking. Raises FileNotFoundError if there is none, :class:`CheckpointError` for
    anything else that keeps it from being read."""
    where = path / MANIFEST_NAME
    try:
        st = os.stat(MANIFEST_NAME, dir_fd=root_fd, follow_symlinks=False)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CheckpointError(f"{where} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{where} is a {describe(st.st_mode)}, not a regular file; ckptbus does not read it")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise CheckpointError(f"{where} has {st.st_size} bytes, more than a manifest ever holds; not read")
    try:
        fd = os.open(MANIFEST_NAME, _FILE_FLAGS, dir_fd=root_fd)
    except OSError as exc:
        raise CheckpointError(f"{where} cannot be read: {exc.strerror}") from None
    with open(fd, "rb", closefd=True) as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise CheckpointError(f"{where} is not a regular file; ckptbus does not read it")
        data = fh.read(MAX_MANIFEST_BYTES + 1)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{where} is not UTF-8 text: {exc}") from None


__all__ = [
    "MANIFEST_TMP_NAME",
    "MAX_MANIFEST_BYTES",
    "OWN_NAMES",
    "Problem",
    "check_listed",
    "describe",
    "name_problem",
    "open_checkpoint_dir",
    "open_listed",
    "read_manifest_text",
    "symlink_refusal",
    "unlisted_entries",
    "unlisted_problem",
]


def _unreadable(name: str, expected: str, exc: OSError) -> Problem:
    """The problem of a listed entry the system would not stat or open (the reason in the system's words)."""
    return Problem(name, expected, exc.strerror or str(exc), f"{name} cannot be read: {exc.strerror}")
