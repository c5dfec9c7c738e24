"""train.py refuses an output_dir it cannot write: exit 2, one line naming the directory, before torch (issue 24).

Before, the run trained up to its first step and ended in a raw traceback on
metrics.jsonl. Real directories and permissions: as root (which writes
anywhere), the run is started without ``CAP_DAC_OVERRIDE`` (``setpriv``), so
that the directory's mode applies to it as to any other user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from runs import REPO


def train(config: Path, *, drop_root_override: bool = False) -> subprocess.CompletedProcess[str]:
    prefix: list[str] = []
    if drop_root_override and os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: a read-only directory cannot be made to refuse root")
        prefix = [setpriv, "--bounding-set=-dac_override"]
    return subprocess.run(
        [*prefix, sys.executable, "-X", "importtime", str(REPO / "train.py"), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=config.parent,
    )


def check_refused(proc: subprocess.CompletedProcess[str], output_dir: Path, what: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, lines
    assert f"ERROR output_dir {output_dir} is not writable by this run ({what}" in lines[0], lines[0]
    assert "Make it writable, or give another output_dir (--output-dir DIR, or output_dir in the config)" in lines[0]
    assert "import time:" in proc.stderr and "| torch" not in proc.stderr, "refused before torch is imported"


def test_a_read_only_output_dir_is_refused_before_training(tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    output_dir.chmod(0o555)
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {output_dir}\nmax_steps: 2\n", encoding="utf-8")
    try:
        proc = train(config, drop_root_override=True)
    finally:
        output_dir.chmod(0o755)
    check_refused(proc, output_dir, "the output directory: Permission denied")
    assert list(output_dir.iterdir()) == []


def test_an_output_dir_that_cannot_be_created_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {parent / 'out'}\nmax_steps: 2\n", encoding="utf-8")
    try:
        proc = train(config, drop_root_override=True)
    finally:
        parent.chmod(0o755)
    check_refused(proc, parent / "out", "the output directory: Permission denied")


def test_a_metrics_file_that_cannot_be_appended_to_is_refused(tmp_path: Path) -> None:
    """A directory where train.py appends its metrics: refused even for root."""
    output_dir = tmp_path / "out"
    (output_dir / "metrics.jsonl").mkdir(parents=True)
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {output_dir}\nmax_steps: 2\n", encoding="utf-8")
    check_refused(train(config), output_dir, "metrics.jsonl: Is a directory")
