"""Processes, ports and waiting: what tests (and benchmarks) need around the processes they start.

Standard library only, so a benchmark can import it without pytest. Wait on
conditions with :func:`wait_for`, never on fixed sleeps.
"""

from __future__ import annotations

import os
import resource
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for ``--main_process_port`` and the like)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    condition: Callable[[], T],
    what: str,
    timeout: float = 30.0,
    *,
    interval: float = 0.01,
    details: Callable[[], str] | None = None,
) -> T:
    """Call ``condition`` every ``interval`` seconds until it returns something truthy; return that.

    Raises AssertionError naming ``what`` when ``timeout`` seconds pass first,
    followed by ``details()`` if given (read then: say, the tail of a log).
    An exception ``condition`` raises propagates at once: that is how a
    caller stops waiting early (say, on a process that died).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            more = f"\n{details()}" if details is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{more}")
        time.sleep(interval)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children first-level order."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def process_env(pid: int) -> dict[str, str]:
    """The environment a process started with (empty if it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def limit_file_size(pid: int, nbytes: int | None) -> None:
    """Set the soft ``RLIMIT_FSIZE`` of a running process; ``None`` lifts it again.

    A real "file too large" failure: the process's writes past ``nbytes`` fail
    with EFBIG (Python ignores SIGXFSZ, which would otherwise kill it). Only
    the soft limit changes, so lifting it needs no privilege.
    """
    _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    soft = hard if nbytes is None else nbytes
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))


def fd_count(pid: int) -> int:
    """Open file descriptors of process ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int) -> int:
    """Threads of process ``pid``."""
    return len(os.listdir(f"/proc/{pid}/task"))
