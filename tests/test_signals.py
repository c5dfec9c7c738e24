"""Signals: Ctrl+C and preemption signals save a checkpoint on every rank, then a clean exit.

Everything here uses real signals: ``os.kill(os.getpid(), ...)`` for the
handler logic, and signals to real training processes for the end-to-end
cases (a terminal's Ctrl+C is ``os.killpg`` of the launcher's process group).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import yaml
from ckptbus.plugins.sources.signals import SignalTrigger
from runs import REPO, TrainingRun

from ckptbus import Bus, ConfigError, SaveCompleted, SaveRequested, list_checkpoints, load_config, read_checkpoint
from ckptbus._config import SIGNAL_ACTIONS, SignalsConfig
from ckptbus._coordinator import Decision, decode_vote, encode_vote
from ckptbus._names import STAGING_PREFIX
from ckptbus._source import RunInfo
from testkit.procs import descendants, wait_for

WATCHED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)


@pytest.fixture(autouse=True)
def _handlers_restored() -> Iterator[None]:
    """Fail any test that leaves a signal handler changed or a thread running."""
    before = {s: signal.getsignal(s) for s in WATCHED}
    threads = set(threading.enumerate())
    yield
    after = {s: signal.getsignal(s) for s in WATCHED}
    assert after == before, "a signal handler was left changed"
    # tqdm's monitor (started by from_pretrained's progress bar) lives as long as the process, by design.
    extra = [t for t in threading.enumerate() if t not in threads and t.is_alive() and t.name != "tqdm_monitor"]
    assert not extra, f"threads left running: {extra}"


RUN = RunInfo(rank=0, world_size=1, output_dir=Path("."))


def _trigger(
    actions: dict[str, Any] | None = None, debounce: float = 1.0
) -> tuple[SignalTrigger, list[SaveRequested], Bus]:
    bus = Bus()
    requests: list[SaveRequested] = []
    bus.subscribe("save_requested", requests.append)
    trigger = SignalTrigger(actions or SignalsConfig().actions(), debounce_seconds=debounce)
    return trigger, requests, bus


# -- the handler: records, the training thread publishes ------------------------


def test_sigint_is_recorded_and_published_at_the_next_poll() -> None:
    trigger, requests, bus = _trigger()
    trigger.start(bus, RUN)
    try:
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt
        assert trigger.stop_requested
        assert requests == []  # nothing is published from the handler
        trigger.poll(7)
        assert [(r.kind, r.reason, r.exit_after) for r in requests] == [("weights", "signal:SIGINT", True)]
        trigger.poll(8)
        assert len(requests) == 1
    finally:
        trigger.close()


@pytest.mark.parametrize("action", [a for a in SIGNAL_ACTIONS if a != "none"])
@pytest.mark.parametrize("signum", WATCHED)
def test_each_signal_and_action(signum: signal.Signals, action: str) -> None:
    trigger, requests, bus = _trigger({signum.name: action})
    trigger.start(bus, RUN)
    try:
        os.kill(os.getpid(), signum)
        trigger.poll(3)
    finally:
        trigger.close()
    kind, _, then = action.partition("_")
    assert [(r.kind, r.reason, r.exit_after) for r in requests] == [(kind, f"signal:{signum.name}", then == "exit")]
    assert trigger.stop_requested is (then == "exit")


def test_defaults_and_none_leave_a_signal_alone() -> None:
    assert SignalsConfig().actions() == {
        "SIGINT": "weights_exit",
        "SIGTERM": "full_exit",
        "SIGHUP": "full_exit",
        "SIGUSR1": "none",
    }
    trigger, _, bus = _trigger()
    trigger.start(bus, RUN)
    try:
        assert set(trigger.installed) == {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    finally:
        trigger.close()
    nothing, _, bus = _trigger({"SIGINT": "none", "SIGTERM": "none"})
    nothing.start(bus, RUN)
    assert nothing.installed == ()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    nothing.close()


def test_repeats_within_the_debounce_window_are_one_request() -> None:
    trigger, requests, bus = _trigger(debounce=30.0)
    trigger.start(bus, RUN)
    try:
        for _ in range(3):
            os.kill(os.getpid(), signal.SIGINT)
        trigger.poll(1)
        os.kill(os.getpid(), signal.SIGINT)
        trigger.poll(2)
    finally:
        trigger.close()
    assert len(requests) == 1


def test_continue_then_stop() -> None:
    trigger, requests, bus = _trigger({"SIGUSR1": "full_continue", "SIGINT": "weights_exit"}, debounce=0.0)
    trigger.start(bus, RUN)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)  # saving and going on is never an abort
        trigger.poll(1)
        assert not trigger.stop_requested
        os.kill(os.getpid(), signal.SIGINT)
        trigger.poll(2)
    finally:
        trigger.close()
    assert [(r.reason, r.exit_after) for r in requests] == [("signal:SIGUSR1", False), ("signal:SIGINT", True)]


def test_chains_to_a_python_handler_installed_before() -> None:
    seen: list[int] = []

    def user_handler(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)

    previous = signal.signal(signal.SIGTERM, user_handler)
    try:
        trigger, requests, bus = _trigger({"SIGTERM": "full_exit"})
        trigger.start(bus, RUN)
        os.kill(os.getpid(), signal.SIGTERM)
        trigger.poll(1)
        trigger.close()
        assert seen == [signal.SIGTERM]
        assert len(requests) == 1
        assert signal.getsignal(signal.SIGTERM) is user_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize(
    "signum",
    [signal.SIGHUP, signal.SIGINT],
    ids=["SIGHUP-nohup", "SIGINT-background-job"],
)
def test_an_ignored_signal_stays_ignored(signum: signal.Signals, caplog: pytest.LogCaptureFixture) -> None:
    """nohup ignores SIGHUP; a shell starts a background job (``cmd &``) with SIGINT ignored. ckptbus leaves an
    ignored signal ignored, as Python does for SIGINT and the shells for a trap (docs/signals.md)."""
    previous = signal.signal(signum, signal.SIG_IGN)
    try:
        trigger, requests, bus = _trigger({signum.name: "full_exit"})
        trigger.start(bus, RUN)
        assert trigger.installed == ()
        assert f"ckptbus: {signum.name} is ignored by this process" in caplog.text
        os.kill(os.getpid(), signum)
        trigger.poll(1)
        trigger.close()
        assert requests == []
        assert signal.getsignal(signum) == signal.SIG_IGN
    finally:
        signal.signal(signum, previous)


def _ignore_sigint_and_sighup() -> None:
    """preexec_fn: the dispositions a background job under nohup starts with (``nohup make test &``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


@pytest.mark.timeout(600)
def test_signal_tests_pass_with_sigint_and_sighup_inherited_as_ignored(tmp_path: Path) -> None:
    """The suite sets the signal state it assumes (tests/conftest.py): run some of this file's tests, in process
    and with a child process, from a pytest that inherited SIGINT and SIGHUP as ignored."""
    selected = (
        "test_sigint_is_recorded_and_published_at_the_next_poll or test_defaults_and_none_leave_a_signal_alone "
        "or test_close_restores_and_is_idempotent_and_respects_a_later_handler "
        "or test_a_press_forwarded_twice_is_one_press or (test_each_signal_and_action and full_exit)"
    )
    inner = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", f"--basetemp={tmp_path}/in"]
    proc = subprocess.run(
        [*inner, "tests/test_signals.py", "-k", selected],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=540,
        preexec_fn=_ignore_sigint_and_sighup,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    assert re.search(r"\b([6-9]|\d\d) passed", proc.stdout), proc.stdout[-2000:]


def test_close_restores_and_is_idempotent_and_respects_a_later_handler() -> None:
    original = signal.getsignal(signal.SIGTERM)
    trigger, _, bus = _trigger()
    trigger.start(bus, RUN)
    assert signal.getsignal(signal.SIGINT) != signal.default_int_handler

    def later(signum: int, frame: FrameType | None) -> None:
        pass

    signal.signal(signal.SIGTERM, later)  # somebody replaced ours after start()
    trigger.close()
    trigger.close()
    try:
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) is later
    finally:
        signal.signal(signal.SIGTERM, original)


def test_start_twice_installs_once() -> None:
    trigger, _, bus = _trigger()
    trigger.start(bus, RUN)
    trigger.start(bus, RUN)
    trigger.close()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_outside_the_main_thread_warns_and_installs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    trigger, _, bus = _trigger()
    worker = threading.Thread(target=trigger.start, args=(bus, RUN))
    worker.start()
    worker.join()
    assert trigger.installed == ()
    assert "outside the main thread" in caplog.text
    trigger.close()


def test_save_time_is_logged_for_the_signal(caplog: pytest.LogCaptureFixture) -> None:
    trigger, requests, bus = _trigger()
    trigger.start(bus, RUN)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        trigger.poll(4)
        done = SaveCompleted(
            step=4,
            kind="full",
            reasons=("signal",),
            request_ids=(requests[0].request_id,),
            labels=(),
            exit_after=True,
            path="/x/checkpoint-4",
            bytes=1,
            seconds=1.25,
        )
        trigger.bus.publish(done)
    finally:
        trigger.close()
    assert re.search(r"SIGTERM: full checkpoint /x/checkpoint-4 complete [\d.]+ s after the signal", caplog.text)
    assert "writing took 1.25 s" in caplog.text


def test_bad_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown signal 'SIGNOPE'"):
        SignalTrigger({"SIGNOPE": "full_exit"})
    with pytest.raises(ValueError, match="SIGKILL cannot be caught"):
        SignalTrigger({"SIGKILL": "full_exit"})
    with pytest.raises(ValueError, match="action for SIGINT must be one of"):
        SignalTrigger({"SIGINT": "explode"})


# -- a second press: a real process dies at once ---------------------------------

_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from ckptbus import Bus
    from ckptbus._source import RunInfo
    from ckptbus.plugins.sources.signals import SignalTrigger

    bus = Bus()
    requests = []
    bus.subscribe("save_requested", requests.append)
    trigger = SignalTrigger(
        {"SIGINT": "weights_exit", "SIGTERM": "full_exit", "SIGUSR1": "full_continue"},
        debounce_seconds=float(sys.argv[1]),
    )
    trigger.start(bus, RunInfo(rank=0, world_size=1, output_dir=Path(".")))
    print("ready", flush=True)
    for line in sys.stdin:  # the test asks for a poll with each line
        trigger.poll(1)
        print("requests", len(requests), flush=True)
    """
)


@contextlib.contextmanager
def _child(debounce: float) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(debounce)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def _poll(proc: subprocess.Popen[str]) -> str:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM])
def test_a_second_press_after_the_window_kills_at_once(second: signal.Signals) -> None:
    # SIGTERM: under torchrun, a person's second Ctrl+C reaches the workers as SIGTERM.
    with _child(debounce=0.0) as proc:
        proc.send_signal(signal.SIGINT)
        assert _poll(proc) == "requests 1"
        proc.send_signal(second)
        assert proc.wait(timeout=30) == -second
        _, err = proc.communicate(timeout=30)
    assert f"second stopping signal ({second.name}): aborting now" in err
    assert "Traceback" not in err


def test_a_press_forwarded_twice_is_one_press() -> None:
    with _child(debounce=30.0) as proc:
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGINT)  # a launcher forwarding what the terminal also sent
        assert _poll(proc) == "requests 1"
        proc.send_signal(signal.SIGUSR1)
        proc.send_signal(signal.SIGUSR1)
        assert _poll(proc) == "requests 2"
        assert proc.poll() is None
        proc.communicate(timeout=30)  # end of input: the child ends normally
        assert proc.returncode == 0


# -- configuration and the manifest reason ------------------------------------------


def test_config_block_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(tmp_path),
                "dynamic_checkpoint": {"signals": {"sigterm": "weights_exit", "sigusr1": "full_continue"}},
            }
        )
    )
    (cfg,) = load_config(path)
    assert cfg.dynamic_checkpoint.signals.actions()["SIGTERM"] == "weights_exit"
    assert cfg.dynamic_checkpoint.signals.actions()["SIGUSR1"] == "full_continue"
    path.write_text(yaml.safe_dump({"output_dir": "x", "dynamic_checkpoint": {"signals": {"sigterm": "save"}}}))
    with pytest.raises(ConfigError, match=r"dynamic_checkpoint\.signals\.sigterm.*'save'.*'weights_exit'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"dynamic_checkpoint\.signals\.sighup': got 'later'.*'full_continue'"):
        SignalsConfig(sighup="later")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"debounce_seconds': got -1"):
        SignalsConfig(debounce_seconds=-1)


def test_manifest_reason_names_the_signal() -> None:
    request = SaveRequested(kind="weights", reason="signal:SIGTERM", exit_after=True)
    decision = decode_vote(5, encode_vote([request], scheduled=True), [request])
    assert isinstance(decision, Decision)
    assert decision.reason == "schedule+signal:SIGTERM"
    assert decision.signum == signal.SIGTERM


# -- end to end: real runs ---------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _frames_in_tracebacks(log: str) -> list[str]:
    """The ``File "..."`` lines of every Python traceback in ``log``."""
    frames: list[str] = []
    inside = False
    for line in log.replace("\r", "\n").splitlines():
        if line.startswith("Traceback (most recent call last)"):
            inside = True
        elif inside and line.startswith("  "):
            if line.lstrip().startswith("File "):
                frames.append(line.strip())
        else:
            inside = False
    return frames


def _assert_clean_exit(run: TrainingRun, pids: list[int]) -> None:
    """No frame of train.py or ckptbus in any traceback; no process of the run left."""
    ours = [f for f in _frames_in_tracebacks(run.log()) if "train.py" in f or "ckptbus" in f or "/plugins/" in f]
    assert not ours, "traceback from train.py or ckptbus:\n" + "\n".join(ours) + "\n" + run.log_tail()
    assert not [p for p in pids if _alive(p)], "a rank is still running"
    assert not [p for p in descendants(run.pid) if _alive(p)]


def _only_checkpoint(run: TrainingRun) -> Any:
    ckpts = list_checkpoints(run.output_dir)
    assert len(ckpts) == 1, f"{ckpts}\n{run.log_tail()}"
    return ckpts[0]


def _steps_of_request(run: TrainingRun, name: str) -> tuple[int, int]:
    """Where the request is saved, from the log line of poll(): the step it was published at, or the next one
    (where that step's vote is pipelined, it is read at the next step)."""
    match = re.search(
        rf"{name} received \(pid \d+\); every rank saves a \w+ checkpoint at step (\d+) or (\d+)", run.log()
    )
    assert match, run.log_tail()
    first, second = int(match.group(1)), int(match.group(2))
    assert second == first + 1
    return first, second


def _assert_weights_loadable(path: Path) -> None:
    from transformers import GPT2LMHeadModel

    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    GPT2LMHeadModel.from_pretrained(path)


@contextlib.contextmanager
def _child_subreaper() -> Iterator[None]:
    """Adopt orphaned descendants (Linux PR_SET_CHILD_SUBREAPER) so a rank outliving its launcher can be reaped."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_child_subreaper = 36
    if libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) != 0:
        pytest.skip("PR_SET_CHILD_SUBREAPER is not available")
    try:
        yield
    finally:
        libc.prctl(pr_set_child_subreaper, 0, 0, 0, 0)


def _reap(pid: int, timeout: float = 120.0) -> int:
    """Wait for the adopted process ``pid`` and return its exit code (negative: killed by that signal)."""

    def exit_status() -> tuple[int] | None:
        done, status = os.waitpid(pid, os.WNOHANG)
        return (status,) if done else None  # a tuple: an exit status of 0 counts as exited

    (status,) = wait_for(exit_status, f"process {pid} to exit", timeout, interval=0.05)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.slow
def test_ctrl_c_two_ranks(launch: Any) -> None:
    """A terminal's Ctrl+C: SIGINT to the launcher's process group; torchrun forwards it to each rank."""
    run = launch(processes=2)
    pids = sorted(run.wait_for_ranks().values())
    run.wait_for_step(10)
    os.killpg(run.pid, signal.SIGINT)
    started = time.monotonic()
    assert run.wait_exit() == 1  # torchrun re-raises the signal it got: its own traceback, its own status
    assert time.monotonic() - started < 25, "the ranks did not exit before torchrun's 30 s kill"
    info = _only_checkpoint(run)
    assert (info.manifest.kind, info.manifest.reason, info.manifest.world_size) == ("weights", "signal:SIGINT", 2)
    assert info.step in _steps_of_request(run, "SIGINT")
    assert info.step == run.last_step()  # saved where it stopped
    _assert_weights_loadable(info.path)
    assert "exiting with status 130" in run.log()
    assert "forcefully exiting" not in run.log()
    _assert_clean_exit(run, pids)


@pytest.mark.slow
@pytest.mark.parametrize("votes", ["shared memory", "collective"])
def test_a_signal_to_one_rank_saves_on_every_rank(launch: Any, votes: str) -> None:
    """Only rank 1 gets the signal; the votes carry it to rank 0, through shared memory (ranks on one machine)
    or, as between machines, through a collective (forced with CKPTBUS_VOTES=collective)."""
    run = launch(processes=2, env={"CKPTBUS_VOTES": "collective" if votes == "collective" else "auto"})
    ranks = run.wait_for_ranks()
    run.wait_for_step(10)
    sent_at = run.last_step()
    os.kill(ranks[1], signal.SIGINT)  # kill -INT <pid of rank 1>: rank 0 and the launcher get nothing
    assert run.wait_exit() == 1  # torchrun reports the ranks' status 130 as a failure
    info = _only_checkpoint(run)
    assert (info.manifest.kind, info.manifest.reason) == ("weights", "signal:SIGINT")
    assert sent_at <= info.step <= sent_at + 2
    assert info.step in _steps_of_request(run, "SIGINT")
    assert info.step == run.last_step()
    assert f"the 2 ranks vote through {votes}" in run.log()
    # torchrun's report. The first rank to exit has status 130; torchrun then sends SIGTERM to the ranks
    # still tearing down (their save and last collective are done), which may turn their status into -15.
    report = run.log()[run.log().rindex("ChildFailedError") :]
    statuses = dict(re.findall(r"rank\s*: (\d) \(local_rank: \d\)\s+exitcode\s*: (-?\d+)", report))
    assert set(statuses) == {"0", "1"} and set(statuses.values()) <= {"130", "-15"}, report
    root = report[report.index("Root Cause") :]
    assert re.search(r"exitcode\s*: 130", root), report
    _assert_clean_exit(run, sorted(ranks.values()))


@pytest.mark.slow
def test_ctrl_c_python_single_process(launch: Any) -> None:
    run = launch(processes=1, launcher="python")
    run.wait_for_step(10)
    sent_at = run.last_step()
    os.killpg(run.pid, signal.SIGINT)
    assert run.wait_exit() == 130
    info = _only_checkpoint(run)
    assert (info.manifest.kind, info.manifest.reason, info.manifest.world_size) == ("weights", "signal:SIGINT", 1)
    assert sent_at <= info.step <= sent_at + 2
    _assert_weights_loadable(info.path)
    _assert_clean_exit(run, [run.pid])


@pytest.mark.slow
def test_ctrl_c_accelerate_single_process(launch: Any) -> None:
    """`accelerate launch train.py`: launcher and rank share the terminal's process group, nothing is forwarded.

    The launcher dies of the SIGINT at once (accelerate's KeyboardInterrupt
    traceback); the rank got the same single SIGINT, saves and exits 130 on its
    own, adopted by this test so its status can be read.
    """
    with _child_subreaper():
        run = launch(processes=1)
        (pid,) = run.wait_for_ranks().values()
        run.wait_for_step(10)
        os.killpg(run.pid, signal.SIGINT)
        run.wait_exit()
        assert _reap(pid) == 130
    info = _only_checkpoint(run)
    assert (info.manifest.kind, info.manifest.reason) == ("weights", "signal:SIGINT")
    assert info.step in _steps_of_request(run, "SIGINT")
    assert run.log().count("SIGINT received") == 1
    _assert_clean_exit(run, [pid])


@pytest.mark.slow
def test_sigterm_preemption_two_ranks_saves_full(launch: Any) -> None:
    """Preemption through the launcher (Kubernetes, SLURM without ``B:``): torchrun forwards SIGTERM."""
    run = launch(processes=2)
    pids = sorted(run.wait_for_ranks().values())
    run.wait_for_step(10)
    os.killpg(run.pid, signal.SIGTERM)
    assert run.wait_exit() == 1
    info = _only_checkpoint(run)
    assert (info.manifest.kind, info.manifest.reason) == ("full", "signal:SIGTERM")
    assert "exiting with status 143" in run.log()
    assert re.search(r"SIGTERM: full checkpoint \S+ complete [\d.]+ s after the signal", run.log())
    _assert_clean_exit(run, pids)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "actions", "kind", "status"),
    [
        (signal.SIGHUP, {}, "full", 129),
        (signal.SIGTERM, {"sigterm": "weights_exit"}, "weights", 143),
        (signal.SIGUSR1, {"sigusr1": "full_exit"}, "full", 138),
    ],
)
def test_preemption_mappings_single_process(
    launch: Any, signum: signal.Signals, actions: dict[str, str], kind: str, status: int
) -> None:
    run = launch(processes=1, launcher="python", config={"dynamic_checkpoint": {"signals": actions}})
    run.wait_for_step(5)
    os.kill(run.pid, signum)
    assert run.wait_exit() == status
    info = _only_checkpoint(run)
    assert (info.manifest.kind, info.manifest.reason) == (kind, f"signal:{signum.name}")
    _assert_clean_exit(run, [run.pid])


@pytest.mark.slow
def test_save_and_continue_then_ctrl_c(launch: Any) -> None:
    run = launch(
        processes=1, launcher="python", config={"dynamic_checkpoint": {"signals": {"sigusr1": "full_continue"}}}
    )
    run.wait_for_step(5)
    os.kill(run.pid, signal.SIGUSR1)
    first = run.wait_for(lambda: list_checkpoints(run.output_dir), "the SIGUSR1 checkpoint")[0]
    assert (first.manifest.kind, first.manifest.reason) == ("full", "signal:SIGUSR1")
    run.wait_for_step(first.step + 5)  # training went on
    os.kill(run.pid, signal.SIGINT)
    assert run.wait_exit() == 130
    kinds = [(c.manifest.kind, c.manifest.reason) for c in list_checkpoints(run.output_dir)]
    assert kinds == [("full", "signal:SIGUSR1"), ("weights", "signal:SIGINT")]
    _assert_clean_exit(run, [run.pid])


# A model (50M parameters) whose full checkpoint (about 600 MB with AdamW's state) takes seconds to write, so that
# a second press lands mid-save; the steps stay short. Ctrl+C is mapped to a full save for the same reason.
_BIG = {
    "model": {"n_layer": 1, "n_head": 4, "n_embd": 2048, "vocab_size": 32},
    "micro_batch_size": 1,
    "sequence_len": 8,
}
_SIGNALS = {"sigint": "full_exit", "debounce_seconds": 0.2}


def _earlier_checkpoint(launch: Any) -> Path:
    """A tiny run that leaves checkpoint-1 in its output directory; returns that directory."""
    run = launch(processes=1, launcher="python", name="earlier", config={"max_steps": 1, "save_steps": 1})
    assert run.wait_exit() == 0
    assert [c.step for c in list_checkpoints(run.output_dir)] == [1]
    return Path(run.output_dir)


def _second_press_during_save(run: TrainingRun, press: Any) -> None:
    earlier = list_checkpoints(run.output_dir)
    before = read_checkpoint(earlier[0].path).manifest
    run.wait_for(lambda: len(run.metrics()) >= 3, "two steps of the big run", timeout=300)
    press()
    first_press = time.monotonic()
    run.wait_for(
        lambda: any(p.name.startswith(STAGING_PREFIX) for p in run.output_dir.iterdir()),
        "the staging directory of the signal's save",
        timeout=300,
    )
    while time.monotonic() - first_press < 0.5:  # beyond debounce_seconds (0.2) for certain
        time.sleep(0.05)
    press()
    run.wait_exit(timeout=120)
    after = list_checkpoints(run.output_dir)
    assert [c.step for c in after] == [earlier[0].step], f"the interrupted save looks complete\n{run.log_tail()}"
    assert read_checkpoint(after[0].path).manifest == before  # the earlier checkpoint is intact
    assert any(p.name.startswith(STAGING_PREFIX) for p in run.output_dir.iterdir())
    assert "aborting now; a checkpoint being written is not completed" in run.log()


@pytest.mark.slow
def test_second_ctrl_c_during_a_save_python(launch: Any) -> None:
    output_dir = _earlier_checkpoint(launch)
    config = {**_BIG, "output_dir": str(output_dir), "dynamic_checkpoint": {"signals": _SIGNALS}}
    run = launch(processes=1, launcher="python", config=config)
    _second_press_during_save(run, lambda: os.killpg(run.pid, signal.SIGINT))
    assert run.proc is not None and run.proc.returncode == -signal.SIGINT  # died of the second press
    _assert_clean_exit(run, [run.pid])
    # The next start removes the leftover staging directory.
    again = launch(processes=1, launcher="python", config={"output_dir": str(run.output_dir), "max_steps": 1})
    assert again.wait_exit() == 0
    assert not any(p.name.startswith(STAGING_PREFIX) for p in run.output_dir.iterdir())


@pytest.mark.slow
def test_second_ctrl_c_during_a_save_two_ranks(launch: Any) -> None:
    """torchrun turns the person's second Ctrl+C into SIGTERM for the ranks: that aborts too."""
    output_dir = _earlier_checkpoint(launch)
    config = {**_BIG, "output_dir": str(output_dir), "dynamic_checkpoint": {"signals": _SIGNALS}}
    run = launch(processes=2, config=config)
    pids = sorted(run.wait_for_ranks(timeout=300).values())
    _second_press_during_save(run, lambda: os.killpg(run.pid, signal.SIGINT))
    assert "forcefully exiting" not in run.log()
    assert not [p for p in pids if _alive(p)]


def test_the_first_press_is_answered_at_once_even_before_the_step_ends() -> None:
    """The child is between two polls (a long step): the answer comes from the handler, before any poll."""
    with _child(debounce=30.0) as proc:
        proc.send_signal(signal.SIGINT)
        assert proc.stderr is not None
        line = ""
        while not line.strip():  # the answer starts with a newline, so that it never sits inside a progress bar
            line = proc.stderr.readline()
        assert line.strip() == (
            "ckptbus: SIGINT: every rank saves a weights checkpoint at the end of this step, then stops; "
            "press Ctrl+C again to abort without it"
        )
        assert _poll(proc) == "requests 1"
