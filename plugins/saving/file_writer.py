"""One file of a full save, written in the format ``accelerator.save_state`` writes, digested as it is written.

``save_state`` hands a path to ``torch.save`` or ``safetensors``' writer, so
its bytes never pass through Python. ckptbus writes the same objects into a
file object of its own instead (:class:`DigestingFile`): every byte is hashed
on its way to the file, so the manifest's digest is of what was written, not
of what a later read finds, and nothing is read back. ``torch.save`` takes a
file object as it is; a safetensors file is serialized with
``safetensors.torch.save`` (the same bytes ``save_file`` writes) and then
written.

The digests of every rank's files travel to the committer in one collective
at the commit, which records them in the manifest
(``ckptbus._layout.write_manifest``).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import clean_state_dict_for_safetensors
from safetensors.torch import save as safetensors_bytes

from ckptbus._digest import Digester

_CHUNK = 8 << 20  # the hash runs fastest on pieces that stay in the CPU cache


class DigestingFile:
    """A binary file open for writing whose every byte also goes into a :class:`~ckptbus._digest.Digester`."""

    def __init__(self, path: Path, *, digest: bool = True) -> None:
        self.path = path
        self.digest = digest
        self._file = open(path, "wb")  # noqa: SIM115 (closed by close(), after the fsync)
        self.digester = Digester()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view) if self.digest else 0, _CHUNK):
            self.digester.update(view[start : start + _CHUNK])
        written = self._file.write(view)
        self.size += len(view)
        return written if written is not None else len(view)

    def flush(self) -> None:
        self._file.flush()

    def close(self, *, fsync: bool = True) -> None:
        """Flush, fsync (unless told not to) and close."""
        try:
            self._file.flush()
            if fsync:
                os.fsync(self._file.fileno())
        finally:
            self._file.close()


def save(obj: Any, f: DigestingFile, *, safe_serialization: bool = False) -> None:
    """Write ``obj`` into ``f`` as accelerate's ``save`` writes it to a path (safetensors for a model's state)."""
    if safe_serialization:
        if isinstance(obj, OrderedDict):
            obj = clean_state_dict_for_safetensors(obj)
        f.write(safetensors_bytes(obj, metadata={"format": "pt"}))
    else:
        torch.save(obj, f)  # type: ignore[arg-type]  # (any object with write() and flush())
