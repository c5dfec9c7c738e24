"""Fixtures shared by the tests: a guard against leaks, and real training runs killed with their process tree."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import slurm_cluster
from leaks import Snapshot, kill, leftovers, mark_owned_processes
from runs import TrainingRun, finished_run, shared_dir

mark_owned_processes()

# How long what a test started may take to go away after its teardown: a SIGKILLed rank of 2 GB takes a moment to
# exit, more so on 2 cores shared with other runs. Only a test that leaks waits this long.
LEAK_WAIT = 10.0


FOREGROUND_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGQUIT)
"""The signals the tests send and expect handled (ckptbus's, and torchrun's forwarding)."""


@pytest.fixture(autouse=True, scope="session")
def _foreground_signals() -> Iterator[None]:
    """Give the session the signal dispositions of a command started in a terminal's foreground, however pytest
    was started, and so every process it launches (an ignored signal stays ignored across exec; a handler
    becomes the default action).

    Started from a background job (``make test &``), ``nohup`` or some CI runners, a process inherits SIGINT
    (and SIGQUIT; SIGHUP with nohup) as ignored, and ckptbus leaves an ignored signal ignored, as Python and
    the shells do (docs/signals.md): tests that send those signals would find nothing installed.
    tests/test_signals.py checks that product behaviour itself, with the signal ignored on purpose, and runs
    some of its tests under an inherited SIG_IGN to check this fixture.
    """
    previous = {signum: signal.getsignal(signum) for signum in FOREGROUND_SIGNALS}
    for signum, handler in previous.items():
        if handler == signal.SIG_IGN:
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    yield
    for signum, handler in previous.items():
        if handler == signal.SIG_IGN:
            signal.signal(signum, handler)


@pytest.fixture(autouse=True)
def _assert_no_leaks() -> Iterator[None]:
    """Fail a test that leaves a thread, a process or a socket behind (pytest reports an error at its teardown).

    Autouse in the top conftest, so it is set up before every function-scoped
    fixture a test asks for and torn down after them: a fixture that kills
    its runs has done so when this looks. (pytest orders the autouse fixtures
    of one file by name: this name sorts before the others here.) Fixtures of
    a wider scope (a run shared by a module) are set up before it, so what
    they hold is in the snapshot and never counted. Leaked processes are
    killed, so that the next tests do not run beside them.
    """
    before = Snapshot.take()
    yield
    left = leftovers(before, LEAK_WAIT)
    if not left:
        return
    kill(left.processes)
    message = f"the test left this behind ({LEAK_WAIT:g} s after its teardown; its processes are killed now):\n"
    pytest.fail(message + left.describe(), pytrace=False)


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., TrainingRun]]:
    """``launch(processes=2, config={...})`` starts a training run; all are killed at teardown."""
    runs: list[TrainingRun] = []

    def start(**kwargs: Any) -> TrainingRun:
        kwargs.setdefault("name", f"run{len(runs)}")
        run = TrainingRun(tmp_path, **kwargs).start()
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.kill()


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., TrainingRun]:
    """``shared_run(processes=2, config={...})``: a finished run of train.py that every test of the session asking
    for the same processes and config shares, on every pytest-xdist worker (runs.finished_run). Read it, never
    write into its output_dir: copy what a test changes."""
    root = shared_dir(tmp_path_factory.getbasetemp())

    def get(**kwargs: Any) -> TrainingRun:
        return finished_run(root, **kwargs)

    return get


@pytest.fixture(autouse=True)
def _ckptbus_logs_propagate(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ckptbus")


@pytest.hookimpl(trylast=True)  # after pytest-xdist's own, which ends the workers (and so their leases)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Leave no SLURM daemon running that this session started (tests/test_slurm.py); a worker only gives up its
    lease, the controller (or a session without workers) stops them once nobody uses them."""
    if hasattr(session.config, "workerinput"):
        slurm_cluster.release()
    else:
        slurm_cluster.stop_if_unused()
