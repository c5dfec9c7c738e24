"""An asynchronous save written by a forked process (``dynamic_checkpoint.async_writer: process``).

A writer thread shares the training process's GIL: while it pickles and
digests, the training thread's Python code waits for it (published figure for
PyTorch's own thread-based async save: 700 to 320 tokens/s). A process does
not. Forking at the agreed step also makes the snapshot free: the child sees
the state of that step through copy-on-write memory, so nothing is copied up
front and ``optimizer.step()`` never waits for a copy; the kernel copies a
page only when training changes it.

The child writes exactly what :class:`~.async_writer.WriteJob` writes (same
files, same digests), reports its digests or its error through a pipe and
leaves with ``os._exit``: it runs no collective, no cleanup of the parent's,
and ignores SIGINT (the parent decides what a Ctrl+C means); it dies with the
parent. Only CPU tensors can be read in a child, so runs with CUDA tensors keep
the thread.

A child that is stopped (SIGSTOP, a freezer) for :data:`STOPPED_GRACE`
seconds running while its parent runs is killed and the save fails, with a
message naming the pid: it would otherwise hold the save in flight for ever
(and, at a stop or a scheduled step, the training of every rank). A Ctrl+Z
stops parent and child together, and a ``fg`` resumes both: that is no stall.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import threading
import time
from pathlib import Path
from typing import Any

from .async_writer import Snapshot, WriteJob
from .errors import describe_write_error

_PR_SET_PDEATHSIG = 1  # prctl(2): a signal for this process when its parent dies

STOPPED_GRACE = 30.0
"""Seconds a writer process may stay stopped while its parent runs before it is killed and the save fails."""


class _Ended:
    """``done`` of a :class:`ProcessWriteJob`: ``is_set()`` reaps the child without blocking."""

    def __init__(self, job: ProcessWriteJob) -> None:
        self._job = job

    def is_set(self) -> bool:
        return self._job.reap(block=False)


class ProcessWriteJob:
    """Writes one :class:`Snapshot` of live state into ``staging`` from a forked child; the same interface as
    :class:`WriteJob` (``start``, ``done``, ``wait``, ``wait_copied``, ``error``, ``seconds``, ``digests``)."""

    def __init__(
        self, snapshot: Snapshot, staging: Path, *, torch_save_crc32: bool = False, digest: bool = True
    ) -> None:
        self._writer = WriteJob(snapshot, staging, torch_save_crc32=torch_save_crc32, digest=digest)
        self.snapshot = snapshot
        self.error: str | None = None
        self.seconds = 0.0
        self.digests: dict[str, str] = {}
        self.copied = threading.Event()
        self.copied.set()  # nothing to copy: the child has the state as it was at the fork
        self.done = _Ended(self)
        self._pid = 0
        self._fd = -1
        self._report = bytearray()
        self._started = 0.0
        self._stopped_since: float | None = None

    def start(self) -> None:
        """Fork the writer. A fork the system refuses (memory, process limits) ends the job at once with that error,
        so the ranks agree on the failure at the next step as for any other writer error."""
        self._started = time.perf_counter()
        try:
            read, write = os.pipe()
            pid = os.fork()
        except OSError as exc:
            self.error = f"starting the writer process failed: {exc}"
            return
        if pid == 0:  # the child: write, report, leave
            os.close(read)
            _child_run(self._writer, write)
        os.close(write)
        os.set_blocking(read, False)  # read as the report comes: a child blocked on a full pipe would never end
        self._pid, self._fd = pid, read

    @property
    def pid(self) -> int:
        """The writer process's pid while it runs (0 before and after)."""
        return self._pid

    @property
    def who(self) -> str:
        return f"the writer process (pid {self._pid})"

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the child to end, ``timeout`` seconds at most; whether it ended. It wakes when the child
        reports, and once a second to see whether it was stopped (module docstring)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.reap(block=False):
            left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if left <= 0:
                return False
            select.select([self._fd], [], [], left)
        return True

    def wait_copied(self, limit: float | None = None) -> float:
        return 0.0

    def give_up(self, why: str) -> None:
        """Kill the child and end the job as failed with ``why``."""
        if self._pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)
            self._collect(os.waitpid(self._pid, 0)[1], error=why)

    def reap(self, *, block: bool) -> bool:
        """Whether the child ended (collecting its report once it did). A child stopped for too long is killed."""
        if not self._pid:
            return True
        if block:
            os.set_blocking(self._fd, True)
        self._read_report()  # until the child closed the pipe (blocking), or what is there now
        pid, status = os.waitpid(self._pid, 0 if block else os.WNOHANG)
        if pid == 0:
            self._check_stopped()
            return not self._pid
        self._collect(status)
        return True

    def _check_stopped(self) -> None:
        if not _is_stopped(self._pid):
            self._stopped_since = None
            return
        now = time.monotonic()
        self._stopped_since = self._stopped_since or now
        if now - self._stopped_since >= STOPPED_GRACE:
            self.give_up(
                f"{self.who} was stopped for {STOPPED_GRACE:.0f} s (SIGSTOP?) while training ran; it was killed "
                "and this save failed (nothing of it was made visible)"
            )

    def _collect(self, status: int, *, error: str | None = None) -> None:
        self._pid = 0
        self.seconds = time.perf_counter() - self._started
        os.set_blocking(self._fd, True)
        self._read_report()
        os.close(self._fd)
        try:
            result: dict[str, Any] = json.loads(self._report) if self._report else {}
        except ValueError:
            result = {}
        self.digests = {str(k): str(v) for k, v in result.get("digests", {}).items()}
        self.error = error or result.get("error")
        if self.error is None and (status != 0 or "digests" not in result):
            self.error = f"the writer process ended without finishing ({_describe(status)})"

    def _read_report(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self._fd, 1 << 16):
                self._report += chunk


def _child_run(writer: WriteJob, pipe: int) -> None:
    """The child's whole life: never returns."""
    code = 0
    report: dict[str, Any]
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(signum, signal.SIG_DFL)
        with contextlib.suppress(Exception):  # Linux only; elsewhere the child may outlive a killed parent
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        writer.write()
        report = {"digests": writer.digests}
    except BaseException as exc:
        room = describe_write_error(exc, writer.staging, free_before=writer.free_before)
        report = {"error": room or f"{type(exc).__name__}: {exc}"}
        code = 1
    try:
        data = json.dumps(report).encode()
        while data:
            data = data[os.write(pipe, data) :]
    finally:
        os._exit(code)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _is_stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (state T or t in /proc; False where /proc cannot tell)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rpartition(b")")[2].split()[0]  # after the command name, which may hold spaces
    except (OSError, IndexError):
        return False
    return state in (b"T", b"t")
