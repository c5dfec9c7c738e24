"""Every benchmark in its smoke mode: each arm end to end, and a well-formed result.

A benchmark that nothing runs breaks unnoticed when the code under it moves
(issue 26: overhead.py read an attribute the runtime no longer had, and the
figures of docs/performance.md could not be reproduced). Each one runs here
as its documented command runs it, a module from the repository root, with
``--smoke`` (a few steps, rounds and bytes). The benchmark checks its own
result before it exits (benchmarks/output.py: the keys it reports, every
number finite); this test checks that it exited 0 and wrote strict JSON into
the test's temporary directory, and that nothing was written over
benchmarks/results/.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from runs import REPO, TrainingRun, accelerate_launch

from benchmarks.output import RESULTS, problems

TIMEOUT = 420.0
"""Seconds one smoke run may take: about 20-60 s alone, several times that on 2 cores shared with other tests."""

LAUNCHED = {"overhead", "save_stall", "digest_cost", "remote_training"}
"""Run under ``accelerate launch`` (2 ranks); the others start their own runs, each on a free port."""
PLOTS = {"overhead", "save_stall", "latency", "scale"}
"""Draw a PNG beside their JSON."""
SAVES_OPTION = {
    "save_stall": "--dir",
    "digest_cost": "--dir",
    "sharded_save": "--dir",
    "scale": "--work",
    "preemption_compare": "--work",
}
"""The option that says where a benchmark writes its checkpoints (into the test's temporary directory here)."""
BENCHMARKS = sorted(
    [
        *LAUNCHED,
        "latency",
        "cli_startup",
        "scale",
        "sharded_save",
        "crash_rescue",
        "remote_upload",
        "preemption_compare",
    ]
)
NOT_BENCHMARKS = {
    "__init__",
    "output",
    "plots",
    "run_all",
    "scale_worker",
    "crash_rescue_dying",
    "crash_rescue_copy",
    "preemption_worker",
}
"""Modules of benchmarks/ that measure nothing themselves (scale_worker runs under scale, the crash_rescue_ ones
under crash_rescue, preemption_worker under preemption_compare)."""


def test_every_benchmark_has_a_smoke_test() -> None:
    found = {p.stem for p in (REPO / "benchmarks").glob("*.py")} - NOT_BENCHMARKS
    assert found == set(BENCHMARKS), "a benchmark without a smoke test here (or one listed that is gone)"


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def strict_json(text: str) -> object:
    def refuse(constant: str) -> object:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 60)
@pytest.mark.parametrize("name", BENCHMARKS)
def test_smoke(name: str, tmp_path: Path) -> None:
    out = tmp_path / f"{name}.json"
    args = ["--smoke", "--out", str(out)]
    if name in SAVES_OPTION:
        args += [SAVES_OPTION[name], str(tmp_path / "saves")]
    module = f"benchmarks.{name}"
    command = accelerate_launch(module, *args, module=True) if name in LAUNCHED else [sys.executable, "-m", module]
    if name not in LAUNCHED:
        command += args
    published = snapshot(RESULTS)
    run = TrainingRun(tmp_path, name=name)
    try:
        run.start(command, cwd=REPO)
        code = run.wait_exit(TIMEOUT)
    finally:
        run.kill()
    assert code == 0, f"{' '.join(command)} exited {code}:\n{run.log_tail()}"
    result = strict_json(out.read_text(encoding="utf-8"))
    assert isinstance(result, dict) and result, result
    assert problems(result, []) == []
    if name in PLOTS:
        assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if name == "cli_startup":  # what the benchmark is for: the CLI starts without torch
        assert result["torch_loaded"] is False and result["median_seconds"]["import ckptbus.cli"] > 0
    assert snapshot(RESULTS) == published, "a smoke run wrote into benchmarks/results/"
