"""File modes in the core (ckptbus/_modes.py): one mode for every file of a checkpoint, following the umask."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from runs import REPO

from ckptbus._modes import apply_umask_modes, current_umask


def test_every_file_and_folder_gets_the_mode_the_umask_gives(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint-8"
    (checkpoint / "shards").mkdir(parents=True)
    for name, mode in (("model.safetensors", 0o600), ("optimizer.bin", 0o644), ("shards/a.bin", 0o640)):
        (checkpoint / name).write_bytes(b"x")
        os.chmod(checkpoint / name, mode)
    os.chmod(checkpoint / "shards", 0o700)
    (checkpoint / "link").symlink_to(checkpoint / "optimizer.bin")
    apply_umask_modes(checkpoint)
    mask = current_umask()
    for name in ("model.safetensors", "optimizer.bin", "shards/a.bin"):
        assert stat.S_IMODE((checkpoint / name).stat().st_mode) == 0o666 & ~mask, name
    for folder in (checkpoint, checkpoint / "shards"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask
    assert (checkpoint / "link").is_symlink(), "a link is left as it is"


def test_the_modes_follow_another_umask_too(tmp_path: Path) -> None:
    """In a child, so the umask of the test process (and its other threads) is never changed."""
    child = (
        "import os, stat, sys; from pathlib import Path; os.umask(0o077); "
        "from ckptbus._modes import apply_umask_modes; d = Path(sys.argv[1]); apply_umask_modes(d); "
        "print(oct(stat.S_IMODE((d / 'f').stat().st_mode)), oct(stat.S_IMODE(d.stat().st_mode)))"
    )
    (tmp_path / "f").write_bytes(b"x")
    os.chmod(tmp_path / "f", 0o644)
    done = subprocess.run(
        [sys.executable, "-c", child, str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.stdout.split() == ["0o600", "0o700"], done.stderr


def test_the_umask_is_read_without_changing_it() -> None:
    child = (
        "import os; os.umask(0o027); from ckptbus._modes import current_umask; "
        "m = current_umask(); assert os.umask(0o027) == 0o027; print(oct(m))"
    )
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.stdout.strip() == "0o27", done.stderr


def test_a_missing_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        apply_umask_modes(tmp_path / "absent")
