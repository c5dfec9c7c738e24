"""The benchmark figures redraw from the JSON results alone (benchmarks/plots.py, no torch, no benchmark run)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.plots import ratio_of_medians_interval

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "result",
    ["overhead.json", "save_stall.json", "h100/overhead_16cores_cpu_gloo.json", "h100/save_stall_cuda.json"],
)
def test_redraw_from_json(result: str, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    copy = tmp_path / Path(result).name
    shutil.copy(RESULTS / result, copy)
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.plots", str(copy)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert copy.with_suffix(".png").read_bytes()[:8] == PNG


def test_interval_when_the_run_recorded_none() -> None:
    """An older result without a recorded interval gets one computed from its samples, around its figure."""
    base = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0]
    low, high = ratio_of_medians_interval(base, [b * 1.02 for b in base])
    assert low <= 1 / 1.02 <= high and high - low < 1e-9  # same noise in both arms: no spread at all
    low, high = ratio_of_medians_interval(base, list(reversed(base)))
    assert low < 1.0 < high
