"""What a test leaves behind: threads, processes and sockets that outlive it.

The autouse ``_assert_no_leaks`` fixture (tests/conftest.py) takes a :class:`Snapshot`
before each test; after the test's teardown, :func:`leftovers` waits a few
seconds for whatever is new to go away and returns what stayed.

Processes count as this test session's when they run below it, or when they
carry :data:`OWNER_ENV` with this process's pid in their environment: a rank
whose launcher was SIGKILLed is adopted by init and is no longer below us,
but it still holds a port and a CPU.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from testkit.procs import wait_for

OWNER_ENV = "CKPTBUS_TESTS_OWNER"
"""Set to the pid of the pytest process; every process a test starts inherits it."""


def mark_owned_processes() -> None:
    """From now on, every process started from here (and below) carries this process's pid in ``OWNER_ENV``."""
    os.environ[OWNER_ENV] = str(os.getpid())


def _ignored_thread(thread: threading.Thread) -> bool:
    # pytest-timeout's timer (its method "thread", used where SIGALRM cannot be) is started before the test and
    # cancelled only after its teardown, so it is alive while the guard looks. It is pytest's, not the test's.
    if thread.name.startswith("pytest_timeout "):
        return True
    # tqdm starts its monitor with the first progress bar of the process (transformers' from_pretrained shows one)
    # and keeps it for the life of the process, by design: closing the bars does not stop it.
    return thread.name == "tqdm_monitor"


@dataclass(frozen=True, slots=True)
class Process:
    pid: int
    started: int  # clock ticks after boot (/proc/<pid>/stat field 22): a pid reused by another process differs here
    ppid: int
    cmdline: str


def _processes() -> set[Process]:
    """The live processes (zombies aside) below this one or carrying its pid in ``OWNER_ENV``.

    A zombie holds no CPU, memory or port, only its pid until its parent
    waits for it; Python's subprocess reaps a forgotten child only at the
    next ``Popen``, so counting zombies would make the guard depend on that.
    """
    me = os.getpid()
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as fh:
                stats[int(entry)] = fh.read().rsplit(")", 1)[1].split()  # [state, ppid, ...]: field 3 onwards
        except OSError:
            continue
    children: dict[int, list[int]] = {}
    for pid, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(pid)
    below: set[int] = set()
    stack = [me]
    while stack:
        for child in children.get(stack.pop(), []):
            below.add(child)
            stack.append(child)
    marker = f"\0{OWNER_ENV}={me}\0".encode()
    born = int(stats[me][19])  # nothing started before this process can be one of its tests'
    found = set()
    for pid, fields in stats.items():
        if pid == me or fields[0] == "Z" or int(fields[19]) < born:
            continue
        if pid not in below and marker not in b"\0" + _read(f"/proc/{pid}/environ"):
            continue
        cmdline = b" ".join(_read(f"/proc/{pid}/cmdline").split(b"\0")).decode(errors="replace").strip()
        found.add(Process(pid, int(fields[19]), int(fields[1]), cmdline))
    return found


def _read(path: str) -> bytes:
    """The bytes of a /proc file; empty when the process is gone or not ours to read."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def kill(processes: frozenset[Process]) -> None:
    """SIGKILL these processes, each only if its pid still names the same process (pids are reused)."""
    for p in processes:
        stat = _read(f"/proc/{p.pid}/stat").rsplit(b")", 1)[-1].split()
        if len(stat) > 19 and int(stat[19]) == p.started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)


def _sockets() -> set[tuple[int, str]]:
    """This process's socket file descriptors: ``(fd, "socket:[inode]")``."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the descriptor listdir itself used, or one closed meanwhile
            continue
        if target.startswith("socket:"):
            found.add((int(fd), target))
    return found


def _address(hex_address: str) -> str:
    """An address as /proc/net/tcp writes it (32-bit words in host order, little-endian here), readable."""
    words = b"".join(bytes.fromhex(hex_address[i : i + 8])[::-1] for i in range(0, len(hex_address), 8))
    return socket.inet_ntop(socket.AF_INET if len(words) == 4 else socket.AF_INET6, words)


def _socket_names() -> dict[str, str]:
    """``{"socket:[inode]": "unix /path" or "tcp 127.0.0.1:port"}`` for this process's network namespace."""
    names: dict[str, str] = {}
    for kind in ("unix", "tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/self/net/{kind}").read_text(encoding="utf-8").splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if kind == "unix" and len(cols) >= 7:
                names[f"socket:[{cols[6]}]"] = f"unix {cols[7] if len(cols) > 7 else '(unnamed)'}"
            elif kind != "unix" and len(cols) >= 10:
                address, port = cols[1].rsplit(":", 1)
                names[f"socket:[{cols[9]}]"] = f"{kind} {_address(address)}:{int(port, 16)}"
    return names


def _where(frame: FrameType | None) -> str:
    """Where a thread is now: its innermost frame outside the threading module."""
    innermost = frame
    while frame is not None and frame.f_code.co_filename == threading.__file__:
        frame = frame.f_back
    frame = frame or innermost
    return f", at {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}" if frame else ""


@dataclass(frozen=True, slots=True)
class Snapshot:
    threads: frozenset[threading.Thread] = field(default_factory=frozenset)
    processes: frozenset[Process] = field(default_factory=frozenset)
    sockets: frozenset[tuple[int, str]] = field(default_factory=frozenset)

    @classmethod
    def take(cls) -> Snapshot:
        threads = frozenset(t for t in threading.enumerate() if t.is_alive())
        return cls(threads, frozenset(_processes()), frozenset(_sockets()))

    def __sub__(self, before: Snapshot) -> Snapshot:
        """What is here and was not ``before`` (less what is not a test's to clean up)."""
        threads = frozenset(t for t in self.threads - before.threads if not _ignored_thread(t))
        return Snapshot(threads, self.processes - before.processes, self.sockets - before.sockets)

    def __bool__(self) -> bool:
        return bool(self.threads or self.processes or self.sockets)

    def describe(self) -> str:
        frames = sys._current_frames()
        names = _socket_names() if self.sockets else {}
        lines = []
        for t in sorted(self.threads, key=lambda t: t.name):
            target = getattr(t, "_target", None)  # threading keeps it while the thread runs
            name = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', repr(target))}"
            runs = f", running {name.lstrip('.')}" if target is not None else ""
            where = _where(frames.get(t.ident or -1))
            lines.append(f"  thread {t.name!r}{' (daemon)' if t.daemon else ''}{runs}{where}")
        for p in sorted(self.processes, key=lambda p: p.pid):
            lines.append(f"  process {p.pid} (parent {p.ppid}): {p.cmdline[:300]}")
        for fd, target in sorted(self.sockets):
            lines.append(f"  socket fd {fd}: {names.get(target, target)}")
        return "\n".join(lines)


def leftovers(before: Snapshot, timeout: float) -> Snapshot:
    """What is new since ``before`` and still there after up to ``timeout`` seconds (empty if all went away).

    A socket or thread dropped in a reference cycle (say, held by a caught
    exception's traceback) goes away only when the garbage collector runs:
    it is collected here before anything counts as left behind.
    """
    left = Snapshot()

    def all_gone() -> bool:
        nonlocal left
        left = Snapshot.take() - before
        if left:
            gc.collect()
            left = Snapshot.take() - before
        return not left

    try:
        wait_for(all_gone, "what the test started to go away", timeout, interval=0.1)
    except AssertionError:
        return left
    return Snapshot()
