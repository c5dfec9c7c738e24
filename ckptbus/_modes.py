"""One file mode for every file of a checkpoint, following the umask.

The writers of one checkpoint create files in different ways (``torch.save``,
safetensors, a temporary file renamed into place, which ``tempfile`` creates
with mode 0600), so a teammate could read the optimizer state but not the
weights. :func:`apply_umask_modes` gives every file ``0666 & ~umask`` and
every folder ``0777 & ~umask``, as ``open()`` and ``mkdir`` would.

Standard library only (no torch): the commit strategies of the core call it.
"""

from __future__ import annotations

import os
from pathlib import Path


def apply_umask_modes(directory: str | os.PathLike[str]) -> None:
    """Give every file under ``directory`` mode ``0666 & ~umask`` and every folder ``0777 & ~umask``.

    Call before the files are fsynced (the committer, before the manifest is
    written), so the modes are part of what is made durable. Symbolic links
    are left alone. Raises :class:`OSError` if a mode cannot be changed.
    """
    mask = current_umask()
    root = Path(directory)
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o777 & ~mask)


def current_umask() -> int:
    """This process's umask, read without changing it (``os.umask`` would, for every thread, for an instant).

    Reads ``/proc/self/status``; where there is none (not Linux), falls back to setting and restoring the
    umask. Never raises."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc (not Linux): the only other way to read it
    os.umask(mask)
    return mask


__all__ = ["apply_umask_modes", "current_umask"]
