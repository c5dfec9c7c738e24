"""Content digests of checkpoint files: the hash, computed while the files are written.

The manifest of a checkpoint records, for every file, its size and a digest
``"xxh3_128:<32 hex digits>"`` (:class:`Digester` on the bytes as they are
written). Checking them (``verify_checkpoint``, which reads every file again
and compares; resume calls it before anything is loaded, and so does
``ckptbus verify``) is ckptbus/_verify.py's.

Why XXH3-128: it is not a cryptographic hash (a checkpoint is not protected
against someone who wants to forge one), but it catches the damage that does
happen (a flipped bit, a block of zeros, a file copied short or from another
step) and runs far faster than a disk can deliver bytes, so verifying costs
about one read of the checkpoint. 128 bits keep accidental collisions out of
the question.

This module imports no torch (the CLI uses it) and nothing of ckptbus: the
manifest (``_manifest``) and the verification (``_verify``) import it, never
the other way round. The verification's names are still importable from here
(``from ckptbus._digest import verify_checkpoint``), loaded when first asked
for (:func:`__getattr__`), since ``_verify`` imports the layout, which
imports this module.
"""

from __future__ import annotations

import os
from typing import Any, Final

import xxhash

ALGORITHM: Final = "xxh3_128"
"""The digest algorithm of new checkpoints: the prefix of every digest in a manifest."""

CHUNK_BYTES: Final = 8 << 20
"""Read size of :func:`digest_file`: large enough that the per-call overhead vanishes, small enough for any host."""


class Digester:
    """The running digest of one file's bytes, fed in the order they are written.

    ``update`` takes any bytes-like object (``bytes``, ``bytearray``,
    ``memoryview``, a NumPy array's buffer) without copying it.
    """

    __slots__ = ("_hash",)

    def __init__(self) -> None:
        self._hash = xxhash.xxh3_128()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._hash.update(data)

    def value(self) -> str:
        """``"xxh3_128:<32 hex digits>"`` of everything given so far (more updates may follow)."""
        return f"{ALGORITHM}:{self._hash.hexdigest()}"


def digest_file(path: str | os.PathLike[str]) -> str:
    """The digest of the file at ``path``, read in chunks. Raises :class:`OSError` if it cannot be read."""
    digester = Digester()
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    # Unbuffered: readinto fills our one buffer straight from the kernel, no second copy per chunk.
    with open(path, "rb", buffering=0) as fh:
        while count := fh.readinto(buffer):
            digester.update(view[:count])
    return digester.value()


def digest_fd(fd: int, limit: int) -> tuple[str, int]:
    """The digest of the open file ``fd`` from its current offset, and the bytes read: at most ``limit`` + 1,
    so a file that grows while it is read is noticed without reading on forever. Raises :class:`OSError`."""
    digester = Digester()
    buffer = bytearray(min(CHUNK_BYTES, limit + 1))
    view = memoryview(buffer)
    read = 0
    with open(fd, "rb", buffering=0, closefd=False) as fh:
        while read <= limit and (count := fh.readinto(view[: min(len(buffer), limit + 1 - read)])):
            digester.update(view[:count])
            read += count
    return digester.value(), read


_MOVED_TO_VERIFY: Final = frozenset({"VERIFY_MODES", "VerifyMode", "VerifyReport", "verify_checkpoint"})


def __getattr__(name: str) -> Any:
    """The names that moved to ckptbus/_verify.py, for code that still imports them from here.

    Imported on first use, not at the top: ``_verify`` imports the layout, which imports this module, so a
    top-level import would close a circle. Raises AttributeError for any other name."""
    if name in _MOVED_TO_VERIFY:
        from . import _verify

        return getattr(_verify, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ALGORITHM", "CHUNK_BYTES", "Digester", "digest_fd", "digest_file"]
