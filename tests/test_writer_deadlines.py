"""Every wait on an asynchronous writer has a deadline, and a writer that passes it fails the save, not the run.

A forked writer that is stopped (SIGSTOP, a freezer) is killed after
``STOPPED_GRACE`` seconds and the save fails naming its pid; a writer thread
that does not end is given up at ``Ranks.wait_limit()`` (a minute short of the
process group's timeout). In both cases the sink reports ``NotWritten``,
nothing is committed, and the next save works. Real processes and real
signals: the writer is a real forked child, stopped with a real SIGSTOP.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from ckptbus.plugins.distributed import Ranks
from ckptbus.plugins.saving import writer_process
from ckptbus.plugins.saving.async_writer import WriteJob
from test_sinks_in_process import Training, leftovers, record, started, training  # noqa: F401  (the fixture)

from ckptbus import list_checkpoints
from ckptbus._sink import NotWritten, Written


def test_a_stopped_writer_process_fails_the_save_and_the_next_save_works(
    training: Training,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(writer_process, "STOPPED_GRACE", 0.5)
    sink = started(training, tmp_path, async_save=True, async_writer="process")
    assert sink.begin(record(3)) is None
    job = sink._async.job if sink._async is not None else None
    assert isinstance(job, writer_process.ProcessWriteJob) and job.pid
    pid = job.pid
    os.kill(pid, signal.SIGSTOP)
    began = time.monotonic()
    outcome = sink.poll(wait=True)
    assert isinstance(outcome, NotWritten), outcome
    assert f"pid {pid}" in outcome.error and "stopped" in outcome.error, outcome.error
    assert time.monotonic() - began < 30
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped: no zombie left behind
    assert list_checkpoints(tmp_path) == [] and leftovers(tmp_path) == []
    training.step()
    assert isinstance(sink.execute(record(4)), Written)


def test_a_stopped_writer_process_is_found_by_the_polls_of_ordinary_steps(
    training: Training,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(writer_process, "STOPPED_GRACE", 0.3)
    sink = started(training, tmp_path, async_save=True, async_writer="process")
    assert sink.begin(record(3)) is None
    assert sink._async is not None and isinstance(sink._async.job, writer_process.ProcessWriteJob)
    os.kill(sink._async.job.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 30
    outcome = None
    while outcome is None and time.monotonic() < deadline:
        outcome = sink.poll(wait=False)  # what a step boundary does while the save is in flight
        time.sleep(0.05)
    assert isinstance(outcome, NotWritten) and "stopped" in outcome.error, outcome


def test_a_writer_process_that_was_stopped_and_continued_in_time_completes_the_save(
    training: Training,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Ctrl+Z and fg (or any pause shorter than the grace) is no failure."""
    monkeypatch.setattr(writer_process, "STOPPED_GRACE", 30.0)
    sink = started(training, tmp_path, async_save=True, async_writer="process")
    assert sink.begin(record(3)) is None
    assert sink._async is not None and isinstance(sink._async.job, writer_process.ProcessWriteJob)
    pid = sink._async.job.pid
    os.kill(pid, signal.SIGSTOP)
    assert sink.poll(wait=False) is None
    time.sleep(0.3)
    os.kill(pid, signal.SIGCONT)
    assert isinstance(sink.poll(wait=True), Written)


def test_a_writer_thread_that_does_not_end_is_given_up_at_the_wait_limit(
    training: Training,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = threading.Event()
    real_write = WriteJob.write

    def stuck_write(self: WriteJob) -> None:
        release.wait(60)  # a write that hangs (a dead NFS server, say) until the test lets it go
        real_write(self)

    monkeypatch.setattr(WriteJob, "write", stuck_write)
    monkeypatch.setattr(Ranks, "wait_limit", lambda self: 1.0)
    sink = started(training, tmp_path, async_save=True)
    assert sink.begin(record(3)) is None
    assert sink._async is not None
    thread = sink._async.job._thread  # type: ignore[union-attr]
    try:
        outcome = sink.poll(wait=True)
        assert isinstance(outcome, NotWritten), outcome
        assert "did not finish the save of step 3 within 1 s" in outcome.error
        assert "writer thread" in outcome.error
        assert list_checkpoints(tmp_path) == []
    finally:
        release.set()
        thread.join(60)  # the given-up thread ends on its own once its write returns (the leak guard checks)


def test_the_wait_limit_is_a_minute_short_of_the_process_group_timeout() -> None:
    class Collective:
        world_size = 2

        def timeout(self) -> Any:
            from datetime import timedelta

            return timedelta(minutes=10)

    assert Ranks(collective=Collective()).wait_limit() == 540.0  # type: ignore[arg-type]
    assert Ranks().wait_limit() == 1740.0  # one process: torch's default of 30 minutes
