"""The digest a :class:`DigestingFile` records is of the bytes it wrote, whichever way each write was hashed.

The hash runs on a helper thread: during the fsync at ``close`` for memory
that stays as it is until then (bytes objects, the storage of the CPU
tensors of the object being saved), alongside the write for any other large
buffer, at once or copied into the queue for small ones. These tests
write real files and compare the recorded digest with one read back from
disk; the ones that change a buffer right after ``write`` returned fail if a
buffer that may be freed or reused were hashed late.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from ckptbus.plugins.saving.file_writer import _OVERLAP_BYTES, DigestingFile, save
from safetensors.torch import load_file

from ckptbus._digest import digest_file

LARGE = 2 * _OVERLAP_BYTES // 4  # float32 elements: twice the size from which writes go to the helper


def _state() -> dict[str, object]:
    torch.manual_seed(0)
    return {
        "big": torch.randn(LARGE),
        "view_of_big": torch.randn(LARGE)[LARGE // 4 :],  # a view: its storage is larger than its data
        "small": torch.randn(7),
        "sparse": torch.randn(LARGE // 1024, 1024).to_sparse(),  # no storage of its own to keep
        "nested": [{"step": 3, "exp_avg": torch.randn(LARGE)}, (torch.arange(5),)],
    }


def _written(tmp_path: Path, obj: object, *, safe: bool = False) -> tuple[str, Path]:
    path = tmp_path / ("model.safetensors" if safe else "state.bin")
    out = DigestingFile(path)
    save(obj, out, safe_serialization=safe)
    out.close()
    return out.digester.value(), path


def test_torch_save_digest_is_of_the_bytes_on_disk_and_the_file_loads(tmp_path: Path) -> None:
    state = _state()
    digest, path = _written(tmp_path, state)
    assert digest == digest_file(path)
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["big"], state["big"])
    assert torch.equal(loaded["sparse"].to_dense(), state["sparse"].to_dense())  # type: ignore[attr-defined]


def test_safetensors_digest_is_of_the_bytes_on_disk_and_the_file_loads(tmp_path: Path) -> None:
    torch.manual_seed(1)
    state = {"a.weight": torch.randn(LARGE), "b.bias": torch.randn(3)}
    digest, path = _written(tmp_path, state, safe=True)
    assert digest == digest_file(path)
    assert torch.equal(load_file(path)["a.weight"], state["a.weight"])


def test_a_buffer_changed_right_after_write_returned_is_hashed_as_written(tmp_path: Path) -> None:
    """A bytearray is neither immutable nor a kept tensor: its hash must be done when write() returns."""
    path = tmp_path / "raw.bin"
    out = DigestingFile(path)
    buffers = [bytearray(b"\x01" * (_OVERLAP_BYTES + 5)), bytearray(b"\x02" * 100)]
    for buffer in buffers:
        out.write(buffer)
        buffer[:] = b"\xff" * len(buffer)  # what a caller reusing or freeing its buffer does
    out.close()
    assert out.digester.value() == digest_file(path)


def test_small_writes_after_a_deferred_one_keep_file_order(tmp_path: Path) -> None:
    path = tmp_path / "ordered.bin"
    out = DigestingFile(path)
    out.write(bytes(range(256)) * (_OVERLAP_BYTES // 256 + 1))  # deferred: an immutable bytes object
    small = bytearray(b"tail")
    out.write(small)  # copied into the queue behind it
    small[:] = b"XXXX"
    out.close()
    assert out.digester.value() == digest_file(path)


def test_no_digest_means_no_hashing_thread(tmp_path: Path) -> None:
    before = {t.name for t in threading.enumerate()}
    out = DigestingFile(tmp_path / "plain.bin", digest=False)
    save(_state(), out)
    assert not any(t.name.startswith("ckptbus-hash") for t in threading.enumerate() if t.name not in before)
    out.close()


def test_a_failed_write_stops_the_helper_and_raises() -> None:
    """/dev/full refuses every write with ENOSPC: write raises, close stops the helper (the leak guard checks)."""
    out = DigestingFile(Path("/dev/full"))
    with pytest.raises(OSError, match="No space left"):
        out.write(bytes(2 * _OVERLAP_BYTES))  # deferred hash: the helper is running
    out.close(fsync=False)
