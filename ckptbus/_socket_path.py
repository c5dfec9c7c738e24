"""Where a run's UNIX socket lives, how the CLI finds it, and binding it safely.

The socket is ``<output_dir>/ckptbus.sock`` unless the config names another
path (``dynamic_checkpoint.socket.path``, absolute or relative to
``output_dir``). A UNIX socket address holds at most
:data:`MAX_SOCKET_PATH_BYTES` bytes of path, so when that path is longer the
run binds a short one instead (see ``docs/socket.md``):

    <base>/<24 hex digits of sha256(the intended path, resolved)>.sock

``<base>`` is ``$XDG_RUNTIME_DIR/ckptbus`` when ``XDG_RUNTIME_DIR`` is an
absolute directory owned by this user (and short enough), else
``/tmp/ckptbus-<uid>``; it is created with mode 0700, and refused if it is a
symlink, belongs to someone else, or is open to group or others.

Whenever the socket is not at ``<output_dir>/ckptbus.sock``, the run writes
the real path into the pointer file ``<output_dir>/ckptbus.sock.path`` (and
removes it at exit), so ``ckptbus ... --output-dir DIR`` finds it even where
the CLI's ``XDG_RUNTIME_DIR`` differs; without a pointer the CLI computes the
same hash itself.

Binding never removes anything but a stale socket of ours: a socket file
owned by this user that refuses connections (its run is gone). Anything else
at the path (a regular file, a directory, a symlink, a live socket) is left
alone and reported with :class:`SocketPathError`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import socket
import stat
import sys
from pathlib import Path
from typing import Final

from ._errors import CkptbusError

# Re-exported (``as``): the socket's names were defined here once, and the CLI's tests import them from here.
from ._names import POINTER_NAME as POINTER_NAME
from ._names import SOCKET_NAME as SOCKET_NAME

logger = logging.getLogger("ckptbus")
# sun_path is 108 bytes on Linux and 104 on macOS, one of them for the NUL.
MAX_SOCKET_PATH_BYTES: Final = 103 if sys.platform == "darwin" else 107
SOCKET_MODE: Final = 0o600
_HASH_CHARS: Final = 24
_MAX_BASE_BYTES: Final = MAX_SOCKET_PATH_BYTES - _HASH_CHARS - len("/.sock")


class SocketPathError(CkptbusError, OSError):
    """The socket cannot be bound (or found) at its path; the message says what is there and what to do."""


def fits(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is short enough to be a UNIX socket address."""
    return len(os.fsencode(path)) <= MAX_SOCKET_PATH_BYTES


def default_socket_path(output_dir: str | os.PathLike[str]) -> Path:
    return Path(os.path.abspath(output_dir)) / SOCKET_NAME


def intended_socket_path(output_dir: str | os.PathLike[str], configured: str | None = None) -> Path:
    """The path the config asks for: ``configured`` (absolute, or relative to ``output_dir``) or the default."""
    if configured is None:
        return default_socket_path(output_dir)
    return Path(os.path.abspath(os.path.join(output_dir, configured)))


def pointer_path(output_dir: str | os.PathLike[str]) -> Path:
    return Path(os.path.abspath(output_dir)) / POINTER_NAME


def fallback_base() -> Path:
    """The private directory for short socket paths (not created here)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isabs(runtime) and len(os.fsencode(runtime)) + len("/ckptbus") <= _MAX_BASE_BYTES:
        with contextlib.suppress(OSError):
            st = os.stat(runtime)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
                return Path(runtime) / "ckptbus"
    return Path("/tmp") / f"ckptbus-{os.geteuid()}"


def fallback_socket_path(intended: str | os.PathLike[str]) -> Path:
    """The short, deterministic path used when ``intended`` is too long."""
    digest = hashlib.sha256(os.fsencode(os.path.realpath(intended))).hexdigest()[:_HASH_CHARS]
    return fallback_base() / f"{digest}.sock"


def server_socket_path(output_dir: str | os.PathLike[str], configured: str | None = None) -> Path:
    """Where the run binds: the intended path if it fits, else its fallback."""
    intended = intended_socket_path(output_dir, configured)
    return intended if fits(intended) else fallback_socket_path(intended)


def client_socket_path(
    *, output_dir: str | os.PathLike[str] | None = None, configured: str | None = None, sock: str | None = None
) -> Path:
    """Where the CLI connects, given ``--socket``, or ``--output-dir`` (and the config's socket path).

    With an output directory: the intended socket if it is there, else the
    path in the pointer file, else where the run would have bound (the
    intended path, or its fallback when too long).
    """
    if sock is not None:
        intended = Path(os.path.abspath(sock))
        return intended if fits(intended) else fallback_socket_path(intended)
    if output_dir is None:
        raise ValueError("give output_dir or sock")
    intended = intended_socket_path(output_dir, configured)
    if fits(intended) and _is_socket(intended):
        return intended
    pointed = read_pointer(output_dir)
    if pointed is not None:
        return pointed
    return intended if fits(intended) else fallback_socket_path(intended)


def read_pointer(output_dir: str | os.PathLike[str]) -> Path | None:
    """The socket path in the pointer file, or None if there is none (or it is not one of ours)."""
    try:
        with open(pointer_path(output_dir), "rb") as fh:
            raw = fh.read(4096)
    except OSError:
        return None
    text = raw.decode("utf-8", "replace").strip()
    if "\n" in text or not os.path.isabs(text) or not fits(text) or not text.endswith(".sock"):
        return None
    return Path(text)


def write_pointer(output_dir: str | os.PathLike[str], target: Path) -> Path:
    """Write the pointer file atomically (temporary file, then rename); returns its path."""
    pointer = pointer_path(output_dir)
    tmp = pointer.with_name(f".{POINTER_NAME}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(f"{target}\n")
    os.replace(tmp, pointer)
    return pointer


def remove_pointer(output_dir: str | os.PathLike[str], target: Path) -> None:
    """Remove the pointer file if it still points at ``target`` (a newer run may have replaced it)."""
    if read_pointer(output_dir) == target:
        with contextlib.suppress(OSError):
            os.unlink(pointer_path(output_dir))


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` with mode 0700 if missing; refuse one that others could use or replace."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise SocketPathError(f"{path} is not a directory (it is {_what(st)}); ckptbus needs it for short socket paths")
    if st.st_uid != os.geteuid():
        raise SocketPathError(
            f"{path} belongs to uid {st.st_uid}, not to this user ({os.geteuid()}); refusing to put a socket there. "
            "Set dynamic_checkpoint.socket.path to a short path in a directory of yours."
        )
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


def bind_listener(path: Path, backlog: int = 128) -> tuple[socket.socket, os.stat_result]:
    """A non-blocking listening socket at ``path`` with mode 0600, and the stat of the socket file.

    A stale socket of ours (owned by us, connection refused) is replaced.
    Raises :class:`SocketPathError` when something else is at ``path``, and
    ``OSError`` for other failures (no such directory, no permission).
    """
    if not fits(path):
        raise SocketPathError(
            f"socket path {path} has {len(os.fsencode(path))} bytes; a UNIX socket path holds at most "
            f"{MAX_SOCKET_PATH_BYTES}"
        )
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Linux gives a bound socket file the socket inode's mode less the umask:
        # set it before bind so no moment exists where others may connect...
        os.fchmod(sock.fileno(), SOCKET_MODE)
        sock.bind(os.fspath(path))
        # ...and set it again after, so a umask that removed our own bits does not matter.
        # (Linux has no chmod that refuses symlinks; only a user who may write the directory could swap one in.)
        os.chmod(path, SOCKET_MODE)
        st = os.lstat(path)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock, st


def remove_socket(path: Path, bound: os.stat_result) -> None:
    """Unlink ``path`` if it is still the socket file we bound (same device and inode)."""
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == (bound.st_dev, bound.st_ino) and stat.S_ISSOCK(st.st_mode):
            os.unlink(path)


def _clear_stale(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathError(
            f"{path} exists and is {_what(st)}, not a socket; ckptbus leaves it alone and the socket trigger is off. "
            "Remove it, or set dynamic_checkpoint.socket.path to another path."
        )
    if st.st_uid != os.geteuid():
        raise SocketPathError(
            f"{path} is a socket of uid {st.st_uid}, not ours; ckptbus leaves it alone and the socket trigger is off."
        )
    if _accepts_connections(path):
        raise SocketPathError(
            f"another process serves {path} (a second run with the same output_dir?); ckptbus leaves it alone "
            "and the socket trigger of this run is off."
        )
    os.unlink(path)
    logger.warning("ckptbus: replaced the stale socket %s (its run is gone)", path)


def _accepts_connections(path: Path) -> bool:
    """Connect to ``path``: refused means stale. A live server (even a busy one) counts as live."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(os.fspath(path))
    except OSError as exc:
        # Refused (or gone): stale. A timeout (backlog full), EACCES, ...: not provably stale.
        return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        probe.close()
    return True


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def _what(st: os.stat_result) -> str:
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    return "a special file"
