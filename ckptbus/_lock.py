"""One run per ``output_dir``: a lock taken when a run starts and released when it ends.

Two runs writing into one ``output_dir`` would interleave checkpoints,
rotate each other's, remove each other's staging directories as leftovers
and append to the same ``metrics.jsonl``. So a run takes
``<output_dir>/ckptbus.lock`` before it touches anything there, and a second
run is refused with the holder's host, pid and start time.

Why ``fcntl`` record locks (``lockf``) on a file that is never deleted:

- the kernel drops the lock when its process dies, SIGKILL included, so a
  dead holder never blocks the next run (no stale-pid guessing);
- they are the locks NFS carries between machines (NLM for v3, part of the
  protocol for v4), where ``flock`` may be local to each machine;
- the file is never removed: removing a lock file lets a process that opened
  the old one and one that creates a new one both "hold" the lock.

POSIX record locks belong to a process, and closing *any* descriptor of the
file in that process drops them. So the holder never opens the file a second
time: it writes the holder line through the descriptor it locked, and
:func:`holder_of` answers from memory for a directory this process holds.
Within one process, a second lock on the same directory is refused too
(fcntl would grant it: the locks of one process never conflict).

The lock file is written (truncated, then the holder line), so it must be
the regular file ckptbus created there, and nothing that leads out of
``output_dir``: it is opened without following a symbolic link
(``O_NOFOLLOW``), without blocking on a FIFO (``O_NONBLOCK``), and refused,
with a :class:`~ckptbus.SetupError` naming it and what to do, when it is a
symbolic link, a directory, a FIFO, a socket or a device, or a regular file
with another hard link (a link to a file elsewhere on the filesystem).
Nothing is written before these checks pass. Reading the holder line (the
CLI, a refused run) goes through the same checks and reads a bounded amount.

Imports no torch: the CLI can name a directory's holder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import stat
import sys
import threading
import weakref
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from ._errors import SetupError
from ._names import LOCK_NAME

logger = logging.getLogger("ckptbus")


_HELD_ELSEWHERE = (errno.EACCES, errno.EAGAIN)
_NO_LOCKS_HERE = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
"""Never follow a link out of output_dir; never wait for a writer of a FIFO put there."""
_MAX_HOLDER_BYTES = 64 * 1024
"""A holder line is about 200 bytes; what is read of a lock file to name its holder."""


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds an ``output_dir``: what the lock file says."""

    host: str
    pid: int
    started: str
    """UTC, ISO 8601."""
    command: str

    @classmethod
    def me(cls) -> Holder:
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            command=" ".join(sys.argv)[:300],
        )

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        """The holder written in ``text``, or None (empty: being written, or released)."""
        try:
            data = json.loads(text)
            return cls(str(data["host"]), int(data["pid"]), str(data["started"]), str(data.get("command", "")))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        command = f", command: {self.command}" if self.command else ""
        return f"pid {self.pid} on host {self.host}, running since {self.started}{command}"


class OutputDirLock:
    """This process's hold on one ``output_dir``. Take it with :func:`acquire`; :meth:`release` it at the end."""

    def __init__(self, directory: Path, fd: int, holder: Holder, *, exclusive: bool) -> None:
        self.directory = directory
        self.holder = holder
        self.exclusive = exclusive
        """False where the filesystem refused to lock (a second run would not be kept out)."""
        self._fd: int | None = fd
        # A lock dropped without release() (a start-up that failed half way) still closes its descriptor.
        self._finalizer = weakref.finalize(self, os.close, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Give the directory up: blank the holder line, close the descriptor (which drops the lock). Safe twice."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with _registry_lock:
            if _held.get(self.directory) is self:
                del _held[self.directory]
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # still locked here, so no newer holder's line is erased
        self._finalizer()  # os.close(fd)


_registry_lock = threading.Lock()
_held: weakref.WeakValueDictionary[Path, OutputDirLock] = weakref.WeakValueDictionary()


def acquire(output_dir: str | os.PathLike[str]) -> OutputDirLock:
    """Make this process the only run using ``output_dir`` (which must exist) until :meth:`~OutputDirLock.release`.

    Raises :class:`~ckptbus.SetupError` naming the holder when another
    process, here or on another machine sharing the directory, holds it, or
    when this process holds it already. On a filesystem without working
    locks the run goes on with a warning (the lock is then not exclusive).
    """
    directory = Path(os.path.realpath(output_dir))
    with _registry_lock:
        mine = _held.get(directory)
        if mine is not None and mine.held:
            raise SetupError(
                f"output_dir {str(directory)!r} is already in use by another run in this process "
                f"({mine.holder.describe()}): close() it before starting another on the same output_dir"
            )
        lock = _take(directory)
        _held[directory] = lock
        return lock


def _take(directory: Path) -> OutputDirLock:
    path = directory / LOCK_NAME
    fd = _open_lock_file(path, os.O_RDWR | os.O_CREAT)
    exclusive = True
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in _HELD_ELSEWHERE:
            os.close(fd)
            raise _in_use(directory, path) from None
        if exc.errno not in _NO_LOCKS_HERE:
            os.close(fd)
            raise
        exclusive = False
        logger.warning(
            "ckptbus: the filesystem of %s does not support file locks (%s): a second run on this output_dir "
            "would not be refused; make sure only one run uses it",
            directory,
            exc.strerror,
        )
    holder = Holder.me()
    _write_holder(fd, holder)
    return OutputDirLock(directory, fd, holder, exclusive=exclusive)


def _write_holder(fd: int, holder: Holder) -> None:
    line = (json.dumps(asdict(holder), sort_keys=True) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, line, 0)
    # Other machines read it to name the holder: make it reach a shared filesystem's server now.
    os.fsync(fd)


def _in_use(directory: Path, path: Path) -> SetupError:
    holder = _read_holder(path)  # (this process does not hold it: the registry was asked first)
    who = holder.describe() if holder is not None else "a process that has not written its name yet"
    return SetupError(
        f"output_dir {str(directory)!r} is in use by another run ({who}): two runs in one output_dir would mix "
        "their checkpoints and metrics. Wait for that run to end or stop it, or give this run another output_dir. "
        f"(The lock is {path}; a run that died holds nothing, so if that process is gone on its host, the "
        "filesystem's lock service has not noticed yet: on NFS that can take until its lease expires.)"
    )


def holder_of(output_dir: str | os.PathLike[str]) -> Holder | None:
    """Who holds ``output_dir`` now according to its lock file, or None. Does not say whether the lock is held:
    a holder that ended cleanly blanks the line, one that was killed leaves it."""
    directory = Path(os.path.realpath(output_dir))
    with _registry_lock:
        mine = _held.get(directory)
        if mine is not None and mine.held:
            return mine.holder  # opening the file here would drop this process's lock
    return _read_holder(directory / LOCK_NAME)


def _read_holder(path: Path) -> Holder | None:
    try:
        fd = _open_lock_file(path, os.O_RDONLY)
    except (OSError, SetupError):
        return None  # missing, unreadable, or not a lock file ckptbus wrote: nobody to name
    try:
        data = os.pread(fd, _MAX_HOLDER_BYTES, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    return Holder.parse(data.decode("utf-8", errors="replace"))


def _open_lock_file(path: Path, flags: int) -> int:
    """A descriptor of the lock file at ``path``, opened with ``flags`` and checked to be a regular file with one
    link. Raises :class:`~ckptbus.SetupError` naming the path for anything else there (OSError: could not open)."""
    try:
        fd = os.open(path, flags | _OPEN_FLAGS, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _not_a_lock_file(path, "a symbolic link") from None
        if exc.errno == errno.EISDIR:
            raise _not_a_lock_file(path, "a directory") from None
        if exc.errno == errno.ENXIO:  # a FIFO without a reader, opened for writing without blocking
            raise _not_a_lock_file(path, "a FIFO") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_a_lock_file(path, _kind_of(st.st_mode))
        if st.st_nlink != 1:
            raise _not_a_lock_file(path, f"a file with {st.st_nlink} hard links (it may be a file outside output_dir)")
        # Regular files never block; reads and writes of the holder line are plain blocking I/O again.
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _kind_of(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _not_a_lock_file(path: Path, what: str) -> SetupError:
    return SetupError(
        f"the lock file {path} is {what}, not the regular file ckptbus keeps there to allow one run per output_dir; "
        "it is left as it is (ckptbus never writes through it, so nothing outside output_dir is touched). "
        f"Remove it (rm -r {path}) if no run uses this output_dir, and start again: ckptbus creates a new one"
    )


__all__ = ["LOCK_NAME", "Holder", "OutputDirLock", "acquire", "holder_of"]
