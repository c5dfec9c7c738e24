"""The client side of the socket protocol (used by the CLI; imports no torch).

    for reply in call(path, SaveRequest(label="x"), timeout=60):
        ...

The hierarchy of what :func:`call` raises::

    ClientError            base; ``CkptbusError``
    ├── NotReachable       no run listens at the path (or it refused this user)
    ├── TimedOut           the deadline passed before the server finished replying
    └── ConnectionLost     the run closed the connection in the middle of a reply (it died?)

A reply line that breaks the protocol raises :class:`~ckptbus._protocol.ProtocolError`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._errors import CkptbusError
from ._protocol import MAX_REPLY_BYTES, ProtocolError, Request, encode, parse_reply, request_message

CONNECT_TIMEOUT = 5.0


class ClientError(CkptbusError):
    """The run could not be asked or did not answer."""


class NotReachable(ClientError):
    """No run listens at the socket path, or the run refused this user."""


class TimedOut(ClientError):
    """The deadline passed before the reply was complete."""


class ConnectionLost(ClientError):
    """The connection closed before the reply was complete."""


def call(path: str | os.PathLike[str], request: Request, *, timeout: float | None = None) -> Iterator[dict[str, Any]]:
    """Send ``request`` to the run at ``path``; yield each reply line (parsed) until the server closes.

    ``timeout`` bounds the whole exchange (None: wait as long as the run
    takes, while it lives). Raises the errors in the module docstring.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    sock = _connect(Path(path), deadline)
    try:
        # The server may have answered (busy, forbidden) and closed already: then read what it said.
        with contextlib.suppress(OSError):
            sock.sendall(encode(request_message(request)))
        buffer = b""
        while True:
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                yield parse_reply(line)
            if len(buffer) > MAX_REPLY_BYTES:
                raise ProtocolError("bad_json", f"reply line longer than {MAX_REPLY_BYTES} bytes")
            sock.settimeout(_remaining(deadline))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise TimedOut(f"no complete reply from {path} within {timeout} s") from None
            except OSError as exc:
                # ECONNRESET after whole lines: the server closed without reading all we sent (it
                # answered an error); the caller sees the lines it got, like at end of input.
                if buffer:
                    raise ConnectionLost(f"connection to {path} broke: {exc.strerror or exc}") from None
                return
            if not chunk:
                if buffer.strip():
                    raise ConnectionLost(f"{path} closed the connection in the middle of a reply")
                return
            buffer += chunk
    finally:
        sock.close()


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimedOut("the deadline passed")
    return left


def _connect(path: Path, deadline: float | None) -> socket.socket:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotReachable(
            f"no socket at {path}: no run with dynamic checkpoints is serving this output_dir "
            "(not started yet, ended, or dynamic_checkpoint.socket.enabled is false)"
        ) from None
    except OSError as exc:
        raise NotReachable(f"cannot reach {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise NotReachable(f"{path} is not a socket; it is not a ckptbus run's socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connect_timeout = (
        CONNECT_TIMEOUT if deadline is None else min(CONNECT_TIMEOUT, max(deadline - time.monotonic(), 0.01))
    )
    sock.settimeout(connect_timeout)
    try:
        _connect_retrying(sock, path, time.monotonic() + connect_timeout)
    except ConnectionRefusedError:
        sock.close()
        raise NotReachable(f"nothing listens at {path}: the run that made it is gone (a stale socket)") from None
    except PermissionError:
        sock.close()
        raise NotReachable(
            f"permission denied for {path}: the socket is only for the user running training (mode 0600)"
        ) from None
    except TimeoutError:
        sock.close()
        raise NotReachable(f"the run at {path} did not accept the connection within {connect_timeout:.1f} s") from None
    except OSError as exc:
        sock.close()
        raise NotReachable(f"cannot connect to {path}: {exc.strerror or exc}") from None
    return sock


def _connect_retrying(sock: socket.socket, path: Path, until: float) -> None:
    """``connect``, retried while the server's backlog is full (a UNIX socket then fails with EAGAIN at once)."""
    delay = 0.005
    while True:
        try:
            sock.connect(os.fspath(path))
            return
        except BlockingIOError:
            if time.monotonic() + delay > until:
                raise TimeoutError("the run's connection backlog stayed full") from None
            time.sleep(delay)  # back off: the server thread is accepting
            delay = min(delay * 2, 0.2)
