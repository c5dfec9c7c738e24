"""Start-up mistakes: found before torch, reported once per machine, exit 2, nothing written (issue 25).

Most cases run train.py in a subprocess as a rank of a launched run would
(``LOCAL_RANK``/``RANK`` set, no launcher): fast, and each proves that torch
was never imported. One real ``accelerate launch`` checks that a two-rank run
reports the mistake once. ``make demo``'s guard runs through make itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from runs import BIN, REPO, accelerate_launch

from ckptbus._lock import acquire
from ckptbus._names import LOCK_NAME

# Runs train.main as a script would, then says whether torch was imported, and how long it all took.
PROBE = (
    "import sys, time, json; t = time.perf_counter(); sys.path.insert(0, {repo!r}); import train\n"
    "try:\n    code = train.main(sys.argv[1:])\nexcept SystemExit as exc:\n    code = exc.code\n"
    "print(json.dumps({{'code': code, 'torch': 'torch' in sys.modules, 'seconds': time.perf_counter() - t}}))"
)


def rank(cwd: Path, *args: str, local_rank: int) -> tuple[dict[str, object], list[str]]:
    """train.py's main as rank ``local_rank`` of a launched run on one machine: its verdict and stderr lines."""
    env = {**os.environ, "LOCAL_RANK": str(local_rank), "RANK": str(local_rank), "WORLD_SIZE": "2"}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(repo=str(REPO)), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=env,
    )
    return json.loads(proc.stdout.splitlines()[-1]), proc.stderr.splitlines()


def config(tmp_path: Path, **keys: object) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "max_steps": 3, **keys}), encoding="utf-8")
    return str(path)


def check_refused(tmp_path: Path, args: list[str], expected: str) -> str:
    """Rank 0 prints one line containing ``expected``; rank 1 prints nothing; both exit 2 without torch."""
    main, said = rank(tmp_path, *args, local_rank=0)
    other, quiet = rank(tmp_path, *args, local_rank=1)
    assert main["code"] == 2 and other["code"] == 2, (main, other, said)
    assert not main["torch"] and not other["torch"], "refused only after torch was imported"
    assert len(said) == 1 and expected in said[0], said
    assert quiet == [], "a rank other than the local main process reported too"
    print(f"\nrefused after {main['seconds']:.3f} s in train.main (imports included): {said[0][:100]}")
    return said[0]


def test_a_config_typo(tmp_path: Path) -> None:
    line = check_refused(tmp_path, ["--config", config(tmp_path, max_step=3)], "unknown config key 'max_step'")
    assert line.startswith("train.py: ") and "did you mean 'max_steps'" in line
    assert not (tmp_path / "out").exists()


def test_an_output_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("not a directory")
    line = check_refused(tmp_path, ["--config", config(tmp_path)], f"output_dir {tmp_path / 'out'} is a file")
    assert "Give another output_dir" in line
    assert (tmp_path / "out").read_text() == "not a directory"


def test_a_resume_path_that_does_not_exist(tmp_path: Path) -> None:
    args = ["--config", config(tmp_path), "--resume-from-checkpoint", "out/checkpoint-7"]
    line = check_refused(tmp_path, args, "resume_from_checkpoint 'out/checkpoint-7' does not exist")
    assert f"`ckptbus list --output-dir {tmp_path / 'out'}` shows the complete checkpoints" in line
    assert " DIR" not in line, "the hint names the run's own output_dir"
    assert not (tmp_path / "out").exists(), "nothing is written: no output_dir, no lock"


def test_a_resume_path_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    args = ["--config", config(tmp_path), "--resume-from-checkpoint", str(tmp_path / "elsewhere")]
    check_refused(tmp_path, args, str(tmp_path / "elsewhere"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_accelerate_launch_reports_a_typo_once(tmp_path: Path) -> None:
    """Two real ranks: one line from the main process, no lock, exit 2 from each rank (the launcher then reports
    its failed ranks in its own way, docs/guide.md#start-up-mistakes)."""
    started = time.monotonic()
    proc = subprocess.run(
        accelerate_launch(REPO / "train.py", "--config", config(tmp_path, max_step=3)),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    seconds = time.monotonic() - started
    assert proc.returncode != 0
    assert proc.stderr.count("unknown config key 'max_step'") == 1, proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]  # torch's summary of each failed rank
    assert not (tmp_path / "out" / LOCK_NAME).exists()
    print(f"\naccelerate launch with a config typo: {seconds:.1f} s to the launcher's exit (torch's import included)")


# -- make demo ----------------------------------------------------------------------------


def fresh_demo_dir(cwd: Path) -> subprocess.CompletedProcess[str]:
    """The part of ``make demo`` that empties outputs/demo, run by make from the Makefile in ``cwd``."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    return subprocess.run(
        [make, "-s", f"VENV={BIN.parent}", "--eval", 'fresh: ; @$(BIN)/python -c "$$FRESH_DEMO_DIR"', "fresh"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    demo = tmp_path / "outputs" / "demo"
    (demo / "checkpoint-5").mkdir(parents=True)
    (demo / "metrics.jsonl").write_text("{}\n")
    return tmp_path


def test_make_demo_empties_a_demo_folder_nobody_runs_in(repo_copy: Path) -> None:
    proc = fresh_demo_dir(repo_copy)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (repo_copy / "outputs" / "demo").iterdir()) == [LOCK_NAME]
    shutil.rmtree(repo_copy / "outputs")
    assert fresh_demo_dir(repo_copy).returncode == 0  # no outputs/demo at all: nothing to do


def test_make_demo_refuses_while_a_demo_runs(repo_copy: Path) -> None:
    demo = repo_copy / "outputs" / "demo"
    lock = acquire(demo)  # what a running demo holds; a lock of another process (make's python) conflicts
    try:
        proc = fresh_demo_dir(repo_copy)
    finally:
        lock.release()
    assert proc.returncode != 0
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("make demo:")]
    assert f"a demo is running in outputs/demo (pid {os.getpid()} on " in line and "it is left as it is" in line
    assert (demo / "checkpoint-5").is_dir() and (demo / "metrics.jsonl").exists(), "a running demo lost its files"


# -- the trigger file's folder ------------------------------------------------------------


@pytest.mark.parametrize("where", ["absolute", "inside output_dir"])
def test_a_trigger_file_in_a_folder_that_does_not_exist_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    import logging

    from ckptbus.plugins.sources.file import FileTrigger

    from ckptbus import Bus
    from ckptbus._source import RunInfo

    name = str(tmp_path / "missing" / "go.save") if where == "absolute" else "missing/go.save"
    trigger = FileTrigger(name, check_interval=1)
    with caplog.at_level(logging.WARNING, logger="ckptbus"):
        trigger.start(Bus(), RunInfo(rank=0, world_size=1, output_dir=tmp_path))
    trigger.close()
    (line,) = [r.getMessage() for r in caplog.records if "does not exist" in r.getMessage()]
    assert f"the folder of the trigger file {tmp_path / 'missing' / 'go.save'} does not exist" in line

    caplog.clear()
    (tmp_path / "missing").mkdir()
    with caplog.at_level(logging.WARNING, logger="ckptbus"):
        FileTrigger(name, check_interval=1).start(Bus(), RunInfo(rank=0, world_size=1, output_dir=tmp_path))
    assert not [r for r in caplog.records if "does not exist" in r.getMessage()]
