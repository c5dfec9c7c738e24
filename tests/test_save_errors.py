"""plugins/saving/errors.py: a full disk, a quota or a file-size limit named as such; one mode for every file.

The failures are real: a small tmpfs filled by torch.save, safetensors and
plain writes (skipped where this user cannot mount), and a lowered
``RLIMIT_FSIZE`` in a child process (Python ignores SIGXFSZ, so the write
fails with EFBIG). Quotas cannot be set up here; EDQUOT is recognized by its
errno the same way.
"""

from __future__ import annotations

import errno
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from ckptbus.plugins.saving.errors import describe_write_error, free_bytes
from runs import REPO


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root only; skipped where mounting is not allowed), unmounted at the end."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_torch_save_on_a_full_disk_is_named_no_space_left(full_disk: Path) -> None:
    import torch

    path = full_disk / "optimizer.bin"
    with pytest.raises(RuntimeError) as raised:
        torch.save(torch.zeros(1 << 20), path)  # 4 MiB into 1 MiB
    assert "No space" not in str(raised.value), "torch hides the errno: the case this helper is for"
    message = describe_write_error(raised.value, path, needed=4 << 20)
    assert message is not None
    assert message.startswith(f"No space left on device writing {path} (filesystem {full_disk} (tmpfs), ")
    assert "free now, the save needed 4.2 MB (4194304 bytes)" in message
    assert "save_total_limit" in message and str(raised.value) in message


def test_the_free_space_when_the_save_began_is_named_as_such(full_disk: Path) -> None:
    with pytest.raises(OSError) as raised, open(full_disk / "optimizer.bin", "wb") as fh:
        fh.write(b"\0" * (2 << 20))
    message = describe_write_error(raised.value, full_disk / "optimizer.bin", free_before=1 << 20)
    assert message is not None
    assert "1.0 MB (1048576 bytes) free when the save began, " in message, message
    assert "free now" in message


def test_safetensors_and_plain_writes_on_a_full_disk(full_disk: Path) -> None:
    import torch
    from safetensors.torch import save_file

    with pytest.raises(Exception) as raised:
        save_file({"w": torch.zeros(1 << 20)}, str(full_disk / "model.safetensors"))
    message = describe_write_error(raised.value, full_disk / "model.safetensors")
    assert message is not None and message.startswith("No space left on device writing")
    with pytest.raises(OSError) as plain, open(full_disk / "filler", "wb") as fh:
        fh.write(b"\0" * (2 << 20))
    assert (describe_write_error(plain.value, full_disk / "filler") or "").startswith("No space left on device")
    assert free_bytes(full_disk / "no" / "such" / "dir") == free_bytes(full_disk)


def test_a_file_size_limit_is_named_with_the_limit(tmp_path: Path) -> None:
    child = """
import resource, sys, torch
from ckptbus.plugins.saving.errors import describe_write_error
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    torch.save(torch.zeros(1 << 18), sys.argv[1])
except RuntimeError as exc:
    print(describe_write_error(exc, sys.argv[1], needed=1 << 20))
"""
    path = tmp_path / "optimizer.bin"
    done = subprocess.run(
        [sys.executable, "-c", child, str(path)], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 0, done.stderr
    message = done.stdout.strip()
    assert message.startswith(f"File too large writing {path} ("), message
    assert "this process may write files of at most 65.5 kB (65536 bytes) (ulimit -f)" in message


def test_errors_that_are_not_about_room_are_left_alone(tmp_path: Path) -> None:
    assert describe_write_error(PermissionError(errno.EACCES, "Permission denied"), tmp_path) is None
    assert describe_write_error(ValueError("bad tensor"), tmp_path) is None
    # torch's words for a failed write, with room to spare: not guessed to be a full disk.
    assert describe_write_error(RuntimeError("unexpected pos 64 vs 0"), tmp_path, needed=10) is None
    quota = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert (describe_write_error(quota, tmp_path) or "").startswith("Disk quota exceeded writing")
    wrapped = RuntimeError("write failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert (describe_write_error(wrapped, tmp_path) or "").startswith("No space left on device")
