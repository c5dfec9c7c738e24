"""fsync of files, directories and whole trees: what makes a checkpoint durable before it is called complete.

Its own module so that the manifest (``_manifest``, which fsyncs every file
before it writes itself) and the layout (``_layout``, which fsyncs the parent
after a rename) share it without importing each other. Standard library only.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


def fsync_path(path: Path, *, directory: bool) -> None:
    """fsync the file or (``directory``) the directory at ``path``. Raises :class:`OSError` if it cannot."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> dict[str, int]:
    """fsync every file and directory under ``root``; return {relative path: size}.

    Raises :class:`OSError` naming the entry if anything under ``root`` is neither a regular file nor a
    directory (a symbolic link, a FIFO, a device): a checkpoint holds regular files only, and a reader refuses
    anything else (ckptbus/_contained.py), so such a save must fail rather than be called complete."""
    files: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        for name in [*filenames, *dirnames]:
            mode = os.lstat(d / name).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                why = "neither a regular file nor a directory (all a checkpoint may hold)"
                raise OSError(errno.EINVAL, why, d / name)
        for name in filenames:
            f = d / name
            fsync_path(f, directory=False)
            files[str(f.relative_to(root))] = f.stat().st_size
        fsync_path(d, directory=True)
        dirnames.sort()
    return files


__all__ = ["fsync_path", "fsync_tree"]
