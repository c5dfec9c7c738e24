"""A trigger source of the user's own, under both adapters, and the contract every source keeps.

The source (tests/scripts/every_seconds.py) is written outside the package,
as a user would: a full checkpoint every N seconds, reason ``timer``. Real
2-rank runs of the hand-written accelerate loop (user_loop.py) and of a
``transformers.Trainer`` (trainer_run.py) save because of it, and the
manifest records its reason as it gives it. Objects that are not sources are
refused before training starts. The sources ckptbus ships import no torch.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from runs import REPO, TrainingRun, accelerate_launch

from ckptbus import Bus, RunInfo, SetupError, TriggerSource, list_checkpoints
from ckptbus._source import RegisteredSource, check_source, register_source

SCRIPTS = Path(__file__).parent / "scripts"


# -- the contract (no processes) ---------------------------------------------------


class _Good:
    reason = "timer"

    def start(self, bus: Bus, run: RunInfo) -> None: ...

    def poll(self, step: int) -> None: ...

    def close(self) -> None: ...


class _OldStart(_Good):
    def start(self) -> None:  # type: ignore[override]
        ...


class _BadReason(_Good):
    reason = "Every Hour!"


class _UrgentOne(_Good):
    urgent = 1


class _StopMethod(_Good):
    def stop_requested(self) -> bool:
        return False


class _Stopping(_Good):
    """A source whose stop request comes and goes (a property, read each time)."""

    urgent = True

    def __init__(self) -> None:
        self.stop = False
        self.calls: list[str] = []

    @property
    def stop_requested(self) -> bool:
        return self.stop

    def start(self, bus: Bus, run: RunInfo) -> None:
        self.calls.append("start")

    def poll(self, step: int) -> None:
        self.calls.append(f"poll {step}")

    def close(self) -> None:
        self.calls.append("close")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (object(), "has no start, poll, close method"),
        (lambda: None, "has no start, poll, close method"),
        (_OldStart(), r"start\(\) must take the run's bus and facts"),
        (_BadReason(), "reason 'Every Hour!' must be a short lower-case name"),
        (_UrgentOne(), r"trigger source .*_UrgentOne.*: urgent must be a bool, got 1; allowed: True \(the ranks"),
        (_StopMethod(), r": stop_requested must be a bool, got <bound method .*\(a method: make it a property\)"),
    ],
)
def test_what_is_not_a_source_is_refused_when_registered(source: object, message: str) -> None:
    with pytest.raises(SetupError, match=message):
        register_source(source)
    with pytest.raises(SetupError, match=message):
        check_source(source)


def test_a_good_source_passes_and_is_a_trigger_source() -> None:
    good = _Good()
    assert check_source(good) is good
    assert isinstance(good, TriggerSource)


def test_registering_reads_the_traits_once_with_their_defaults() -> None:
    registered = register_source(_Good())
    assert (registered.reason, registered.urgent, registered.stop_requested()) == ("timer", False, False)
    assert isinstance(registered, TriggerSource), "a registered source is a source itself"
    assert register_source(registered) is registered
    with pytest.raises(AttributeError):
        registered.urgent = True  # type: ignore[misc]  # frozen: read once, at registration
    assert not hasattr(registered, "__dict__")


def test_a_registered_source_forwards_and_reads_stop_requested_each_time() -> None:
    source = _Stopping()
    registered = register_source(source)
    assert (registered.source, registered.reason, registered.urgent) == (source, "timer", True)
    assert registered.stop_requested() is False
    source.stop = True
    assert registered.stop_requested() is True
    registered.start(Bus(), RunInfo(rank=0, world_size=1, output_dir=Path()))
    registered.poll(3)
    registered.close()
    assert source.calls == ["start", "poll 3", "close"]


def test_the_shipped_sources_declare_their_traits() -> None:
    from ckptbus.plugins.sources import BUILTIN_SOURCES, FileTrigger, LauncherWatch, SignalTrigger, UnixSocketTrigger

    assert set(BUILTIN_SOURCES) == {FileTrigger, SignalTrigger, UnixSocketTrigger, LauncherWatch}
    traits = {cls.__name__: (cls.reason, cls.urgent) for cls in BUILTIN_SOURCES}
    assert traits == {
        "FileTrigger": ("file", False),
        "SignalTrigger": ("signal", True),
        "UnixSocketTrigger": ("socket", False),
        "LauncherWatch": ("launcher", False),
    }
    built = [
        FileTrigger("t", check_interval=1),
        SignalTrigger({"SIGUSR1": "full_continue"}),
        UnixSocketTrigger(),
        LauncherWatch(),
    ]
    registered = [register_source(s) for s in built]
    assert [(r.reason, r.urgent, r.stop_requested()) for r in registered] == [
        ("file", False, False),
        ("signal", True, False),
        ("socket", False, False),
        ("launcher", False, False),
    ]
    assert all(isinstance(r, RegisteredSource) for r in registered)


def test_the_trainer_adapter_refuses_a_bad_source_before_training() -> None:
    from ckptbus.plugins.hf_trainer import DynamicCheckpointCallback

    with pytest.raises(SetupError, match="is not a trigger source"):
        DynamicCheckpointCallback({"output_dir": "unused"}, sources=[object()])


def test_the_shipped_sources_import_no_torch() -> None:
    code = (
        "import sys, ckptbus.plugins.sources, ckptbus.plugins.sources.launcher; "
        "heavy = ('torch', 'accelerate', 'transformers'); "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# -- real runs, 2 ranks ---------------------------------------------------------------


@pytest.fixture
def script_run(tmp_path: Path) -> Iterator[Callable[..., TrainingRun]]:
    """``script_run(script, config, *args)``: a script of tests/scripts on 2 ranks; killed at teardown."""
    runs: list[TrainingRun] = []

    def start(script: str, config: dict[str, Any] | None, *args: str) -> TrainingRun:
        run = TrainingRun(tmp_path, name=f"run{len(runs)}", config=config, raw_config=config is not None)
        first = str(run.config_path) if config is not None else str(run.output_dir)
        runs.append(run.start(accelerate_launch(SCRIPTS / script, first, *args)))
        return run

    yield start
    for run in runs:
        run.kill()


def _timer_checkpoints(output_dir: Path) -> list[str]:
    return [c.manifest.reason for c in list_checkpoints(output_dir) if "timer" in c.manifest.reason]


@pytest.mark.slow
def test_a_users_source_saves_through_the_accelerate_loop(script_run: Callable[..., TrainingRun]) -> None:
    run = script_run("user_loop.py", None, "--every", "1")
    # The loop stops by itself 20 steps after its first checkpoint (its own receiver says so).
    assert run.wait_exit() == 0, run.log_tail()
    reasons = _timer_checkpoints(run.output_dir)
    assert reasons and all(r == "timer" for r in reasons), (reasons, run.log_tail())
    events = [e for e in run.events() if e.get("event") == "SaveCompleted"]
    assert events and "timer" in events[0]["reasons"], events


@pytest.mark.slow
def test_a_users_source_saves_through_the_trainer(script_run: Callable[..., TrainingRun], tmp_path: Path) -> None:
    config = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 60,
        "dynamic_checkpoint": {"enabled": True, "check_interval": 5},
    }
    run = script_run("trainer_run.py", config, "--every", "1")
    assert run.wait_exit(timeout=240) == 0, run.log_tail()
    reasons = _timer_checkpoints(Path(config["output_dir"]))
    assert reasons and all(r == "timer" for r in reasons), (reasons, run.log_tail())
