"""Fixtures shared by the tests: a guard against leaks, and real training runs killed with their process tree."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from leaks import Snapshot, kill, leftovers, mark_owned_processes
from runs import TrainingRun

mark_owned_processes()

# How long what a test started may take to go away after its teardown: a SIGKILLed rank of 2 GB takes a moment to
# exit, more so on 2 cores shared with other runs. Only a test that leaks waits this long.
LEAK_WAIT = 10.0


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


@pytest.fixture(autouse=True)
def _ckptbus_logs_propagate(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ckptbus")
