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
(``ckptbus._manifest.write_manifest``).
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import clean_state_dict_for_safetensors
from safetensors.torch import save as safetensors_bytes

from ckptbus._digest import Digester

_CHUNK = 1 << 20
"""Bytes handed to the hash and to the file at a time: small enough to stay in a core's cache between the two."""

_OVERLAP_BYTES = 4 << 20
"""Writes of memory that may not outlive them are hashed on the helper, alongside the write, from this size on."""


class DigestingFile:
    """A binary file open for writing whose every byte also goes into a :class:`~ckptbus._digest.Digester`.

    Why the hash waits for the fsync: hashed inline, in ``write``, it added a
    third to a synchronous save's wall time here; on a helper thread that
    runs alongside the writes, still an eighth where the ranks have no spare
    core (2 ranks on 2 cores: the helper takes its CPU from the writes). The
    fsync at :meth:`close` leaves the writing thread's core idle for longer
    than the hash takes on any disk (the hash runs at several GB/s a core),
    so the bytes are hashed then, on a helper thread, and ``close`` returns
    once every byte is hashed. Updates reach the digest in file order.

    What may be hashed after ``write`` returned is only memory known to stay
    as it is until ``close``:

    - an immutable ``bytes`` object (the queue holds it);
    - the storage of a CPU tensor of the object being saved (announced with
      :meth:`keeps`): ``torch.save`` writes those from the tensors' own
      memory, which the caller keeps alive and unchanged until ``close``.

    Any other large buffer (``torch.save``'s temporary host copy of a GPU
    tensor, freed once written) is hashed on the helper alongside its write,
    and ``write`` returns once that hash is done; small ones (zip headers,
    pickles) are copied into the queue, or hashed at once if it is empty.
    """

    def __init__(self, path: Path, *, digest: bool = True) -> None:
        self.path = path
        self.digest = digest
        self._file = open(path, "wb")  # noqa: SIM115 (closed by close(), after the fsync)
        self.digester = Digester()
        self.size = 0
        self._queued: list[memoryview] = []
        """Bytes written and not hashed yet, in file order; each stays readable until close()."""
        self._kept: list[tuple[int, int]] = []
        self._hasher: ThreadPoolExecutor | None = None
        self._hashes: list[Future[None]] = []
        self.hash_wait_seconds = 0.0
        """Time the writing thread spent hashing or waiting for the helper: what digests cost this file's save."""

    def keeps(self, obj: Any) -> None:
        """Promise that ``obj``'s CPU tensors stay alive and unchanged until :meth:`close` returns."""
        for tensor in _tensors(obj):
            if tensor.device.type != "cpu" or tensor.layout != torch.strided:
                continue  # torch.save writes these from copies it frees: never hashed after write() returns
            storage = tensor.untyped_storage()
            self._kept.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        hashed: Future[None] | None = None
        if not self.digest:
            pass
        elif isinstance(data, bytes) or self._is_kept(view):
            self._queued.append(view)
        elif len(view) >= _OVERLAP_BYTES:
            self._queued.append(view)
            hashed = self._hash_queued()
        elif self._queued:
            self._queued.append(memoryview(bytes(view)))  # behind what is queued: the digest follows file order
        else:
            self._timed(self._hash, [view])
        try:
            for start in range(0, len(view), _CHUNK):
                self._file.write(view[start : start + _CHUNK])
        finally:
            if hashed is not None:  # the buffer may be freed once write() returns, even after a failed write
                self._timed(hashed.result)
        self.size += len(view)
        return len(view)

    def flush(self) -> None:
        self._file.flush()

    def close(self, *, fsync: bool = True) -> None:
        """Flush, fsync (unless told not to) and close; return once every byte written is hashed."""
        try:
            self._file.flush()
            if self._queued:
                self._hash_queued()  # while the fsync waits for the disk
            if fsync:
                os.fsync(self._file.fileno())
        finally:
            self._file.close()
            if self._hasher is not None:
                self._timed(self._hasher.shutdown)
                self._hasher = None
            self._kept.clear()
        hashes, self._hashes = self._hashes, []
        for hashed in hashes:
            hashed.result()  # a hash that failed fails the file

    def _is_kept(self, view: memoryview) -> bool:
        if not self._kept or len(view) < _OVERLAP_BYTES:
            return False
        start = int(np.frombuffer(view, dtype=np.uint8).ctypes.data)
        return any(low <= start and start + len(view) <= high for low, high in self._kept)

    def _hash_queued(self) -> Future[None]:
        """Hand everything queued to the helper thread, in order."""
        # Started on first use, in the process that writes (a writer forked for an async save inherits no
        # threads); close() stops it.
        if self._hasher is None:
            self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptbus-hash")
        views, self._queued = self._queued, []
        hashed = self._hasher.submit(self._hash, views)
        self._hashes.append(hashed)
        return hashed

    def _hash(self, views: list[memoryview]) -> None:
        for view in views:
            for start in range(0, len(view), _CHUNK):
                self.digester.update(view[start : start + _CHUNK])

    def _timed(self, wait: Callable[..., object], *args: Any) -> None:
        started = time.perf_counter()
        wait(*args)
        self.hash_wait_seconds += time.perf_counter() - started


def save(obj: Any, f: DigestingFile, *, safe_serialization: bool = False) -> None:
    """Write ``obj`` into ``f`` as accelerate's ``save`` writes it to a path (safetensors for a model's state).

    The caller keeps ``obj`` alive and unchanged until ``f`` is closed (the file hashes from its memory meanwhile).
    """
    if safe_serialization:
        if isinstance(obj, OrderedDict):
            obj = clean_state_dict_for_safetensors(obj)
        f.write(safetensors_bytes(obj, metadata={"format": "pt"}))
    else:
        f.keeps(obj)
        torch.save(obj, f)  # type: ignore[arg-type]  # (any object with write() and flush())


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in ``obj``'s dicts, lists and tuples (what a state dict or an optimizer's state holds)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)
