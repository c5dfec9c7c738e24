"""A raw client of the run's UNIX socket, for the socket and CLI tests: bytes in, everything answered out."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from typing import Any


def raw_exchange(path: str | os.PathLike[str], data: bytes, *, end_input: bool = True, timeout: float = 30.0) -> bytes:
    """Send ``data`` to the UNIX socket at ``path`` and return everything it answers until it closes.

    ``end_input`` shuts down our sending side after ``data`` (the server sees
    end of input). A connection reset counts as the end of the answer.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        with contextlib.suppress(OSError):  # the server may answer and close before reading it all
            sock.sendall(data)
            if end_input:
                sock.shutdown(socket.SHUT_WR)
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return received
            if not chunk:
                return received
            received += chunk


def reply_lines(answer: bytes) -> list[dict[str, Any]]:
    """The JSON lines of a socket answer."""
    return [json.loads(line) for line in answer.splitlines() if line.strip()]
