"""Ranks never outlive their launcher: a rank whose launcher is gone asks every rank to save and stop.

The unit tests run :class:`LauncherWatch` in a real child process below a
real "launcher" process that the test SIGKILLs (a watch cannot be shown a
dead parent any other way). The end-to-end tests (``slow``) SIGKILL the agent
of real ``accelerate launch`` and ``torchrun`` runs, whose ranks sit in
process groups of their own, and judge by the checkpoint on disk, the log and
the processes left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from ckptbus.plugins.sources.launcher import LAUNCHER_ENV, LauncherWatch, launched
from runs import BIN, REPO, TrainingRun, accelerate_launch

from ckptbus import (
    Bus,
    CheckpointConfig,
    ConfigError,
    DynamicCheckpointConfig,
    SaveRequested,
    SaveStarted,
    list_checkpoints,
    load_config,
)
from ckptbus._config import OnLauncherExit
from ckptbus._source import RunInfo, check_source
from testkit.procs import descendants, free_port, wait_for

# The "rank": a watch polled every few milliseconds, as a training loop would at each step. It records what the
# watch published and logged, then keeps writing to its stdout and stderr, as a progress bar would.
RANK_SCRIPT = textwrap.dedent(
    """
    import json, logging, os, sys, time
    from pathlib import Path
    from ckptbus import Bus, SaveRequested
    from ckptbus._source import RunInfo
    from ckptbus.plugins.sources.launcher import LauncherWatch

    out, kind, stopping = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "stopping"
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    logging.getLogger("ckptbus").addHandler(logging.FileHandler(out / "rank.log"))
    bus = Bus()
    requests = []
    bus.subscribe("save_requested", requests.append)
    watch = LauncherWatch(kind)
    watch.start(bus, RunInfo(rank=0, world_size=2, output_dir=out))
    if stopping:  # Ctrl+C reached this rank first: it is already saving its weights and stopping
        bus.publish(SaveRequested(kind="weights", reason="signal:SIGINT", exit_after=True))
    step = 0
    for _ in range(50):  # the launcher is alive: nothing to ask for
        step += 1
        watch.poll(step)
    early = len(requests) - stopping
    (out / "ready").write_text(str(os.getppid()))
    deadline = time.monotonic() + 60
    while not (watch.launcher_gone and (out / "go").exists()) and time.monotonic() < deadline:
        step += 1
        watch.poll(step)
        time.sleep(0.005)
    for _ in range(20):  # later steps: no second request
        step += 1
        watch.poll(step)
    for _ in range(100):  # what a progress bar and print() do after the launcher is gone
        print("training goes on", flush=True)
        sys.stderr.write("progress\\n")
        sys.stderr.flush()
    watch.close()
    watch.close()
    mine = [r for r in requests if r.reason == "launcher"]
    result = {
        "requests": [[r.kind, r.reason, r.exit_after] for r in mine],
        "early": early,
        "parent": os.getppid(),
        "receivers_left": sum(len(list(getattr(bus, name).receivers)) for name in
                              ("save_requested", "save_started", "save_completed", "save_failed")),
    }
    (out / "result.json").write_text(json.dumps(result))
    """
)

# The "launcher": starts the rank and waits, as torchrun's agent does, until it is killed.
LAUNCHER_SCRIPT = "import subprocess, sys, time; subprocess.Popen(sys.argv[1:]); time.sleep(600)"


class Family:
    """A launcher process and the rank it started, in a session of their own."""

    def __init__(self, tmp_path: Path, kind: str = "full", *, stopping: bool = False, pipe: bool = False) -> None:
        self.out = tmp_path
        script = tmp_path / "rank.py"
        script.write_text(RANK_SCRIPT, encoding="utf-8")
        rank = [sys.executable, str(script), str(tmp_path), kind, "stopping" if stopping else "-"]
        env = {**os.environ, LAUNCHER_ENV[0]: "test"}
        self.reader: int | None = None
        if pipe:  # the rank's output goes to a pipe that only this test reads
            self.reader, writer = os.pipe()
            output: Any = writer
        else:
            output = (tmp_path / "output.log").open("wb")
        self.launcher = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER_SCRIPT, *rank],
            stdout=output,
            stderr=output,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        os.close(output) if pipe else output.close()
        wait_for(lambda: (tmp_path / "ready").exists(), "the rank to start its watch", 60)
        (self.rank,) = descendants(self.launcher.pid)

    def kill_launcher(self, *, reader_first: bool = True) -> None:
        """SIGKILL the launcher; with a pipe, nobody reads the rank's output any more either: the reader goes
        first, or once the rank noticed the launcher gone. Then the rank may write (``go``)."""
        if reader_first:
            self._close_reader()
        self.launcher.kill()
        self.launcher.wait()
        if not reader_first:
            wait_for(lambda: "is gone" in self.log(), "the rank to notice", 30)
            self._close_reader()
        (self.out / "go").touch()

    def _close_reader(self) -> None:
        if self.reader is not None:
            os.close(self.reader)
            self.reader = None

    def result(self) -> dict[str, Any]:
        path = self.out / "result.json"

        def written() -> bool:
            if path.exists():
                return True
            assert _running(self.rank) or path.exists(), f"the rank died before its result\n{self.log()}"
            return False

        wait_for(written, "the rank's result", 60, details=self.log)
        wait_for(lambda: not _running(self.rank), f"rank {self.rank} to exit", 30)
        return dict(json.loads(path.read_text()))

    def log(self) -> str:
        path = self.out / "rank.log"
        return path.read_text(encoding="utf-8") if path.exists() else ""

    def close(self) -> None:
        for pid in (self.rank, self.launcher.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.launcher.wait()
        if self.reader is not None:
            os.close(self.reader)


@pytest.fixture
def family(tmp_path: Path) -> Iterator[Any]:
    made: list[Family] = []

    def make(**kwargs: Any) -> Family:
        made.append(Family(tmp_path, **kwargs))
        return made[-1]

    yield make
    for f in made:
        f.close()


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead and waiting to be reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# -- unit: the watch in a real process tree ------------------------------------------------


@pytest.mark.parametrize("kind", ["full", "weights"])
def test_a_dead_launcher_asks_every_rank_once_to_save_and_stop(family: Any, kind: str) -> None:
    f = family(kind=kind)
    f.kill_launcher()
    result = f.result()
    assert result["early"] == 0, "asked for a save while the launcher was alive"
    assert result["requests"] == [[kind, "launcher", True]]
    assert result["parent"] != f.launcher.pid
    assert result["receivers_left"] == 1, "close() must unsubscribe (the one left is the rank's own recorder)"
    (warning,) = [line for line in f.log().splitlines() if "launcher" in line]
    assert f"the launcher of this rank (pid {f.launcher.pid}) is gone" in warning
    assert f"every rank saves a {kind} checkpoint at the next vote" in warning
    assert "and stops" in warning


@pytest.mark.parametrize("reader_first", [True, False], ids=["reader-gone-first", "reader-gone-after"])
def test_output_that_nobody_reads_any_more_does_not_end_the_rank(family: Any, reader_first: bool) -> None:
    """The launcher's output pipe loses its reader with it: the rank's writes go to /dev/null, not to EPIPE."""
    f = family(pipe=True)
    f.kill_launcher(reader_first=reader_first)
    result = f.result()  # written after 100 prints and progress lines: BrokenPipeError would have ended it
    assert result["requests"] == [["full", "launcher", True]]
    if reader_first:  # else it was found at a later step, and the warning was written while the reader lived
        assert "nothing reads its stdout and stderr any more: sent to /dev/null" in f.log()


def test_a_run_already_stopping_is_left_to_finish(family: Any) -> None:
    f = family(stopping=True)
    f.kill_launcher()
    result = f.result()
    assert result["requests"] == []
    assert "is gone; the run is already saving and stopping as it was asked" in f.log()


# A rank whose launcher dies before ckptbus starts: it imported ckptbus (as train.py does, first thing), then
# "loads the model" until the test says go; only then does the run's checkpointing start.
LATE_RANK_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from ckptbus import Bus
    from ckptbus._source import RunInfo
    from ckptbus.plugins.sources.launcher import LauncherWatch

    out = Path(sys.argv[1])
    (out / "ready").touch()
    while not (out / "go").exists():
        time.sleep(0.01)
    LauncherWatch().start(Bus(), RunInfo(rank=0, world_size=2, output_dir=out))
    (out / "trained").touch()
    """
)

# A rank adopted by init before it imported ckptbus: the launcher died between starting it and the import.
ADOPTED_RANK_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    out = Path(sys.argv[1])
    (out / "ready").touch()
    while not (out / "go").exists():
        time.sleep(0.01)
    (out / "parent").write_text(str(os.getppid()))
    from ckptbus.plugins.sources.launcher import exit_if_launcher_gone
    exit_if_launcher_gone()
    (out / "trained").touch()
    """
)


def _orphan(tmp_path: Path, script: str) -> tuple[int, str, Path]:
    """Start ``script`` as the rank of a "launcher", SIGKILL the launcher once the rank runs, let the rank go on;
    returns the rank's exit status (read from /proc: it is nobody's child here), its output, and its folder."""
    (tmp_path / "rank.py").write_text(script, encoding="utf-8")
    log = tmp_path / "output.log"
    with log.open("wb") as output:
        launcher = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER_SCRIPT, sys.executable, str(tmp_path / "rank.py"), str(tmp_path)],
            stdout=output,
            stderr=output,
            stdin=subprocess.DEVNULL,
            env={**os.environ, LAUNCHER_ENV[0]: "test", "RANK": "1"},
            start_new_session=True,
        )
    try:
        wait_for(lambda: (tmp_path / "ready").exists(), "the rank to start", 60)
        (rank,) = descendants(launcher.pid)
        launcher.kill()
        launcher.wait()
        (tmp_path / "go").touch()
        wait_for(lambda: not _running(rank), "the orphaned rank to exit", 60, details=log.read_text)
    finally:
        with contextlib.suppress(ProcessLookupError, UnboundLocalError):
            os.kill(rank, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(launcher.pid, signal.SIGKILL)
    return launcher.pid, log.read_text(encoding="utf-8"), tmp_path


def test_a_rank_whose_launcher_died_before_start_saves_nothing_and_exits(tmp_path: Path) -> None:
    launcher, output, out = _orphan(tmp_path, LATE_RANK_SCRIPT)
    assert not (out / "trained").exists(), "an orphan went on to train"
    (line,) = output.splitlines()
    assert line.startswith(f"ckptbus: the launcher of this rank (pid {launcher}) is gone (the parent is now pid ")
    assert line.endswith("before training started; rank 1 saves nothing and exits (status 1)")


def test_a_rank_adopted_before_it_imported_ckptbus_exits(tmp_path: Path) -> None:
    _, output, out = _orphan(tmp_path, ADOPTED_RANK_SCRIPT)
    if (out / "parent").read_text() != "1":
        # A subreaper (systemd --user, a container's init shim) adopted it: its command cannot tell it from a
        # launcher, and the rank is watched as before (docs/schedulers.md says so).
        pytest.skip("orphans here are adopted by a subreaper, not by PID 1")
    assert not (out / "trained").exists(), "an orphan went on to train"
    assert "this rank's parent is pid 1 (" in output and "not a launcher: its launcher was gone already" in output


def test_what_counts_as_a_launcher_program() -> None:
    from ckptbus.plugins.sources.launcher import _runs_python

    assert _runs_python(os.getpid())  # python: torchrun and accelerate launch are Python programs
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        wait_for(lambda: Path(f"/proc/{sleeper.pid}/cmdline").read_bytes().startswith(b"sleep"), "exec", 30)
        assert not _runs_python(sleeper.pid)  # what init, tini or a shell look like
    finally:
        sleeper.kill()
        sleeper.wait()
    assert _runs_python(2**22 + 1)  # unreadable (no such process): not judged gone on a guess


def test_a_process_no_launcher_started_is_never_ended() -> None:
    from ckptbus.plugins.sources.launcher import exit_if_launcher_gone, launcher_gone

    assert launcher_gone() is None  # pytest's parent is alive
    assert "is gone (the parent is now pid" in (launcher_gone(launcher=os.getppid() + 1) or "")
    exit_if_launcher_gone({})  # python train.py, from a shell: never judged (returns)


# -- unit: in this process ------------------------------------------------------------------


def _run(world_size: int = 2) -> RunInfo:
    return RunInfo(rank=0, world_size=world_size, output_dir=Path("unused"))


def test_a_live_launcher_is_left_alone() -> None:
    bus = Bus()
    requests: list[SaveRequested] = []
    bus.subscribe("save_requested", requests.append)
    watch = LauncherWatch()
    watch.start(bus, _run())
    try:
        assert watch.watching
        for step in range(1, 200):
            watch.poll(step)
        assert requests == [] and not watch.launcher_gone
    finally:
        watch.close()


def test_only_ranks_started_by_a_launcher_are_watched() -> None:
    assert launched(_run(2), environ={})
    assert not launched(_run(1), environ={})  # python train.py: the parent is a shell (nohup must keep working)
    for name in LAUNCHER_ENV:  # torchrun's agent, accelerate launch with one process
        assert launched(_run(1), environ={name: "x"})


def test_a_stop_decided_on_another_rank_counts_as_stopping() -> None:
    bus = Bus()
    watch = LauncherWatch()
    watch.start(bus, _run())
    try:
        for exit_after in (False, True):  # what every rank publishes once the ranks agreed (here, on another's request)
            bus.publish(
                SaveStarted(
                    step=3, kind="full", reasons=("signal",), request_ids=(), labels=(), exit_after=exit_after, path="p"
                )
            )
            assert watch._stopping is exit_after
    finally:
        watch.close()


def test_the_source_contract() -> None:
    watch = check_source(LauncherWatch("weights"))
    assert getattr(watch, "reason", None) == "launcher"
    # Not urgent: with signals on (the default) the ranks vote at every step anyway; a run that turned them off
    # keeps its votes at check_interval multiples, and the launcher's request is answered at the next of those.
    assert getattr(watch, "urgent", None) is False
    with pytest.raises(ValueError, match="kind must be one of"):
        LauncherWatch("everything")
    LauncherWatch().close()  # never started: nothing to undo


def test_on_launcher_exit_config(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    for value in ("full", "weights", "none"):
        path.write_text(yaml.safe_dump({"output_dir": "o", "dynamic_checkpoint": {"on_launcher_exit": value}}))
        assert load_config(path)[0].dynamic_checkpoint.on_launcher_exit == value
    path.write_text(yaml.safe_dump({"output_dir": "o"}))
    assert load_config(path)[0].dynamic_checkpoint.on_launcher_exit == "full"
    path.write_text(yaml.safe_dump({"output_dir": "o", "dynamic_checkpoint": {"on_launcher_exit": "save"}}))
    with pytest.raises(ConfigError, match=r"dynamic_checkpoint\.on_launcher_exit.*'save'.*'full' or 'weights'"):
        load_config(path)


@pytest.mark.slow  # the runtime imports torch
def test_the_config_builds_the_watch_unless_none() -> None:
    from ckptbus.plugins.runtime import builtin_sources

    def watches(value: OnLauncherExit) -> list[str]:
        dyn = DynamicCheckpointConfig(enabled=True, on_launcher_exit=value)
        return [
            s.kind
            for s in builtin_sources(CheckpointConfig(output_dir="o", dynamic_checkpoint=dyn))
            if isinstance(s, LauncherWatch)
        ]

    assert watches("full") == ["full"]
    assert watches("weights") == ["weights"]
    assert watches("none") == []


# -- end to end: the agent of a real run SIGKILLed ------------------------------------------------


class Orphans:
    """Ranks that outlive their launcher are no longer below the test: remember them to kill them at the end."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def gone(self) -> bool:
        return not any(_running(pid) for pid in self.pids)

    def kill(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def orphans() -> Iterator[Orphans]:
    held = Orphans()
    yield held
    held.kill()


def _launcher_checkpoint(run: TrainingRun) -> Any:
    """The complete checkpoint a dead launcher asked for, once it is there."""
    for info in list_checkpoints(run.output_dir):
        if "launcher" in info.manifest.reason.split("+"):
            return info
    return None


def _kill_agent_and_judge(
    run: TrainingRun,
    orphans: Orphans,
    kind: str,
    *,
    agent: int,
    also: tuple[int, ...] = (),
    before: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """SIGKILL the agent (and ``also``) of a training run; every rank must save ``kind``, stop there, and exit.

    Returns the measured figures: when the first rank noticed, when the checkpoint was complete and when the
    last rank was gone, in seconds after the kill.
    """
    run.wait_for_step(20)
    orphans.pids = list(run.wait_for_ranks().values())
    before()
    killed_at = time.time()
    for pid in (agent, *also):
        os.kill(pid, signal.SIGKILL)
    info = run.wait_for(lambda: _launcher_checkpoint(run), "the checkpoint of a dead launcher", allow_exit=True)
    wait_for(orphans.gone, "every rank to exit", 60, details=run.log_tail)
    gone_at = time.time()
    assert info.manifest.kind == kind and info.manifest.world_size == 2
    if kind == "weights":
        assert (info.path / "model.safetensors").exists()
    else:
        assert {f"random_states_{r}.pkl" for r in (0, 1)} <= set(info.manifest.files)
    assert run.last_step() == info.step, "the ranks trained past the checkpoint"
    events = run.events()
    (asked,) = [e for e in events if e["event"] == "SaveRequested" and e["reason"] == "launcher"]
    # The first: a rank that noticed a step later may have its request answered by this checkpoint once more.
    done = next(e for e in events if e["event"] == "SaveCompleted" and e["path"] == str(info.path))
    return {
        "noticed": asked["requested_at"] - killed_at,
        "saved": done["time"] - killed_at,
        "exited": gone_at - killed_at,
    }


def _report(name: str, figures: dict[str, float]) -> None:
    print(f"\n{name}: " + ", ".join(f"{k} {v:.2f} s after the kill" for k, v in figures.items()))


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[Any]:
    """``runs(command, **kwargs)``: a training run started with ``command(run)`` (default: accelerate launch)."""
    started: list[TrainingRun] = []

    def start(command: Any = None, **kwargs: Any) -> TrainingRun:
        run = TrainingRun(tmp_path, name=f"run{len(started)}", **kwargs)
        started.append(run.start(command(run) if command is not None else None))
        return run

    yield start
    for run in started:
        run.kill()


@pytest.mark.slow
def test_accelerate_launch_agent_sigkilled(runs: Any, orphans: Orphans) -> None:
    run = runs()
    figures = _kill_agent_and_judge(run, orphans, "full", agent=run.pid)
    warnings = [line for line in run.log().splitlines() if f"the launcher of this rank (pid {run.pid}) is gone" in line]
    assert len(warnings) == 2, run.log_tail()  # each rank noticed on its own
    assert all("every rank saves a full checkpoint at the next vote" in line for line in warnings)
    _report("accelerate launch", figures)


@pytest.mark.slow
def test_torchrun_agent_sigkilled(runs: Any, orphans: Orphans) -> None:
    def torchrun(run: TrainingRun) -> list[str]:
        port = str(free_port())
        return [
            str(BIN / "torchrun"),
            "--nproc_per_node",
            "2",
            "--master_port",
            port,
            str(REPO / "train.py"),
            "--config",
            str(run.config_path),
        ]

    run = runs(torchrun, config={"dynamic_checkpoint": {"on_launcher_exit": "weights"}})
    figures = _kill_agent_and_judge(run, orphans, "weights", agent=run.pid)
    assert "every rank saves a weights checkpoint at the next vote" in run.log()
    _report("torchrun", figures)


@pytest.mark.slow
def test_an_output_pipe_that_dies_with_the_agent(runs: Any, orphans: Orphans, tmp_path: Path) -> None:
    """``accelerate launch ... | cat``, both killed at once: nobody reads the ranks' output; they save and exit."""
    piped = tmp_path / "piped.log"

    def through_a_pipe(run: TrainingRun) -> list[str]:
        launch = " ".join(accelerate_launch(REPO / "train.py", "--config", str(run.config_path)))
        return ["bash", "-c", f"{launch} 2>&1 | cat > {piped}"]

    run = runs(through_a_pipe)
    run.wait_for_step(20)
    processes = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in descendants(run.pid)}
    (agent,) = [pid for pid, argv in processes.items() if b"launch" in argv]
    (reader,) = [pid for pid, argv in processes.items() if argv[0] == b"cat"]

    def right_after_the_progress_bar_wrote() -> None:
        # train.py's progress bar writes every 5 s, and on a pipe without a reader it raises BrokenPipeError (tqdm
        # forgives EIO only): a write before rank 0's next step boundary would end it before ckptbus sees the
        # launcher gone. That is train.py's to handle; killing right after a write keeps this test about ckptbus.
        def bars() -> int:
            return piped.read_text(errors="replace").count("it/s")

        seen = bars()
        wait_for(lambda: bars() > seen, "the progress bar to write", 30)

    figures = _kill_agent_and_judge(
        run, orphans, "full", agent=agent, also=(reader, run.pid), before=right_after_the_progress_bar_wrote
    )
    _report("accelerate launch | cat", figures)


# train.py whose model takes until the test says go to build: the ranks have joined their process group and wait
# there, as ranks loading a large model would, when the test kills their launcher.
SLOW_LOADING = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    import train

    build = train.make_model
    def make_model(cfg):
        here = Path({folder!r})
        (here / f"loading-{{os.environ['RANK']}}").touch()
        while not (here / "go").exists():
            time.sleep(0.05)
        return build(cfg)
    train.make_model = make_model
    sys.exit(train.main())
    """
)


@pytest.mark.slow
def test_launcher_killed_while_the_ranks_load_the_model(runs: Any, orphans: Orphans, tmp_path: Path) -> None:
    """No checkpoint, no training, one line per rank, every rank gone, and the output_dir's lock free."""
    from ckptbus import SetupError
    from ckptbus._lock import acquire

    script = tmp_path / "slow_loading.py"
    script.write_text(SLOW_LOADING.format(repo=str(REPO), folder=str(tmp_path)), encoding="utf-8")
    run = runs(lambda run: accelerate_launch(script, "--config", str(run.config_path)))
    loading = [tmp_path / f"loading-{rank}" for rank in (0, 1)]
    run.wait_for(lambda: all(path.exists() for path in loading), "both ranks to load the model")
    orphans.pids = descendants(run.pid)  # the ranks (accelerate launch runs the agent in its own process)
    assert len(orphans.pids) == 2, orphans.pids
    os.kill(run.pid, signal.SIGKILL)
    (tmp_path / "go").touch()
    wait_for(orphans.gone, "every orphaned rank to exit", 120, details=run.log_tail)
    lines = [line for line in run.log().splitlines() if "before training started" in line]
    assert len(lines) == 2, run.log_tail()
    for line in lines:
        assert f"the launcher of this rank (pid {run.pid}) is gone" in line
        assert "saves nothing and exits (status 1)" in line
    assert list_checkpoints(run.output_dir) == [] and run.metrics() == [], "an orphan saved or trained"

    def lock_free() -> bool:  # once the last thread of each rank is gone (a zombie leader may still have threads)
        try:
            acquire(run.output_dir).release()
        except SetupError:
            return False
        return True

    wait_for(lock_free, "the output_dir's lock to be free", 60)
