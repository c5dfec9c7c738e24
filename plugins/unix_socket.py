"""UNIX socket trigger: ``ckptbus request`` asks the running job for a checkpoint and gets the path back.

One thread on the main process serves ``<output_dir>/ckptbus.sock`` (see
:mod:`ckptbus._socket_path` for the path and its fallback, and
``docs/socket.md`` for the protocol). The thread only records: a ``save``
request is published as ``SaveRequested(reason="socket")`` and the ranks
vote on it at the next due step; the reply is sent when ``save_completed``
or ``save_failed`` names the request. Nothing here saves or calls a
collective.

Bad clients cannot hurt training: one thread and one selector serve every
connection, non-blocking; at most ``max_clients`` connections are open (more
get a ``busy`` reply and are closed); a client has ``timeout`` seconds to
send its line, which may not exceed the protocol's size limit; a client that
goes away is forgotten. A client running as another user is refused
(``SO_PEERCRED``), beside the socket's mode 0600.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

from ckptbus import Bus, SaveCompleted, SaveFailed, SaveKind, SaveRequested
from ckptbus._errors import CkptbusError
from ckptbus._protocol import (
    MAX_LINE_BYTES,
    PROTOCOL_VERSION,
    ProtocolError,
    SaveRequest,
    encode,
    error_reply,
    ok_reply,
    parse_request,
)
from ckptbus._socket_path import (
    bind_listener,
    default_socket_path,
    ensure_private_dir,
    intended_socket_path,
    remove_pointer,
    remove_socket,
    server_socket_path,
    write_pointer,
)

logger = logging.getLogger("ckptbus")

DEFAULT_TIMEOUT: Final = 10.0
DEFAULT_MAX_CLIENTS: Final = 64
MAX_OUTSTANDING: Final = 32
"""Socket requests published and not yet answered; more (with new labels) get ``busy``."""
_CLOSE_FLUSH_SECONDS: Final = 1.0
_UCRED: Final = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}
_WAKE: Final = "wake"
_LISTEN: Final = "listen"
_JSON_WHITESPACE: Final = b" \t\n\r"
"""What JSON skips. Not ``bytes.strip()``'s set: a lone ``\\v`` or ``\\f`` is input, answered ``bad_json``."""

StatusProvider = Callable[[], Mapping[str, object]]


class _Conn:
    """One client connection. ``state``: reading its line, waiting for a save, or closing after the reply."""

    __slots__ = ("deadline", "rbuf", "request_id", "sock", "state", "wbuf")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.rbuf = bytearray()
        self.wbuf = bytearray()
        self.state = "reading"
        self.deadline: float | None = deadline
        self.request_id: str | None = None


class UnixSocketTrigger:
    """Serves save and status requests on a UNIX socket. See the module docstring.

    ``path``: the configured socket path (None: ``<output_dir>/ckptbus.sock``).
    ``status``: called (on the socket thread) for the ``status`` op; must only read.
    If the socket cannot be bound, :meth:`start` logs an error and training
    goes on without it (:attr:`path` stays None).
    """

    def __init__(
        self,
        bus: Bus,
        output_dir: str | os.PathLike[str],
        *,
        path: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        status: StatusProvider | None = None,
        max_clients: int = DEFAULT_MAX_CLIENTS,
    ) -> None:
        self.bus = bus
        self.output_dir = Path(output_dir)
        self.configured_path = path
        self.timeout = timeout
        self.max_clients = max_clients
        self._status = status
        self.path: Path | None = None
        """Where the socket is bound, once :meth:`start` succeeded."""
        self._pointer = False
        self._bound: os.stat_result | None = None
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._outcomes: queue.SimpleQueue[SaveCompleted | SaveFailed] = queue.SimpleQueue()
        # Server-thread state (never touched from other threads):
        self._conns: dict[int, _Conn] = {}
        self._outstanding: dict[str, tuple[SaveKind, str | None]] = {}
        self._waiting: dict[str, list[_Conn]] = {}
        self._refused_uids: set[int | None] = set()

    # -- TriggerSource ----------------------------------------------------------

    def start(self) -> None:
        """Bind the socket and start the server thread (call on the main process only)."""
        if self._thread is not None:
            return
        try:
            self._bind()
        except (CkptbusError, OSError) as exc:
            self._release()
            self.path = None
            logger.error("ckptbus: the socket trigger is off: %s", exc)
            return
        self.bus.subscribe("save_completed", self._on_outcome)
        self.bus.subscribe("save_failed", self._on_outcome)
        self._thread = threading.Thread(target=self._serve, name="ckptbus-socket", daemon=True)
        self._thread.start()
        logger.info(
            "ckptbus: serving checkpoint requests on %s (ckptbus request --output-dir %s)", self.path, self.output_dir
        )

    def poll(self, step: int) -> None:
        """Nothing to do at a step: requests arrive on the socket thread."""

    def close(self) -> None:
        """Answer what can be answered, stop the thread, remove the socket. Safe to call twice."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        self._wake()
        thread.join(timeout=10.0)
        if thread.is_alive():  # never seen; the thread is a daemon and will not keep the process alive
            logger.error("ckptbus: the socket thread did not stop within 10 s")
            return
        self.bus.unsubscribe("save_completed", self._on_outcome)
        self.bus.unsubscribe("save_failed", self._on_outcome)
        self._release()

    # -- other threads ----------------------------------------------------------

    def _on_outcome(self, event: SaveCompleted | SaveFailed) -> None:
        """Bus receiver (training thread): record the outcome and wake the server; nothing else."""
        self._outcomes.put(event)
        self._wake()

    def _wake(self) -> None:
        wake = self._wake_w
        if wake is not None:
            with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
                wake.send(b"\0")

    # -- setting up and tearing down ------------------------------------------

    def _bind(self) -> None:
        intended = intended_socket_path(self.output_dir, self.configured_path)
        path = server_socket_path(self.output_dir, self.configured_path)
        if path != intended:
            logger.info("ckptbus: socket path %s is too long for a UNIX socket; using %s", intended, path)
            ensure_private_dir(path.parent)
        self._listener, self._bound = bind_listener(path, backlog=min(128, self.max_clients * 2))
        self.path = path
        if path != default_socket_path(self.output_dir):
            write_pointer(self.output_dir, path)
            self._pointer = True
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, _LISTEN)
        self._selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)

    def _release(self) -> None:
        for conn in list(self._conns.values()):
            self._drop(conn)
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._listener = self._wake_r = self._wake_w = None
        if self.path is not None and self._bound is not None:
            remove_socket(self.path, self._bound)
        if self.path is not None and self._pointer:
            remove_pointer(self.output_dir, self.path)
            self._pointer = False
        self._bound = None

    # -- the server thread ------------------------------------------------------

    def _serve(self) -> None:
        try:
            while not self._stopping.is_set():
                self._serve_once()
            self._finish()
        except Exception:
            logger.exception("ckptbus: the socket server failed; socket requests are off, training continues")
            # Clients now get "connection refused" at once instead of waiting in a backlog nobody serves.
            self._release()

    def _serve_once(self) -> None:
        assert self._selector is not None
        for key, mask in self._selector.select(self._select_timeout()):
            if key.data is _LISTEN:
                self._accept()
            elif key.data is _WAKE:
                self._drain_wake()
            else:
                conn: _Conn = key.data
                if mask & selectors.EVENT_READ:
                    self._read(conn)
                if mask & selectors.EVENT_WRITE and conn.sock.fileno() in self._conns:
                    self._flush(conn)
        self._deliver_outcomes()
        self._expire(time.monotonic())

    def _finish(self) -> None:
        """Stopping: send the outcomes already published, tell everyone else, flush briefly."""
        assert self._selector is not None and self._listener is not None and self._wake_r is not None
        self._selector.unregister(self._listener)
        self._selector.unregister(self._wake_r)
        self._deliver_outcomes()
        for request_id, conns in list(self._waiting.items()):
            for conn in conns:
                self._reply(
                    conn,
                    error_reply(
                        "shutting_down",
                        "the training run is ending; the request was not served",
                        op="save",
                        state="failed",
                        request_id=request_id,
                    ),
                )
        self._waiting.clear()
        deadline = time.monotonic() + _CLOSE_FLUSH_SECONDS
        while any(conn.wbuf for conn in self._conns.values()) and time.monotonic() < deadline:
            for key, mask in self._selector.select(0.05):
                if isinstance(key.data, _Conn) and mask & selectors.EVENT_WRITE:
                    self._flush(key.data)

    def _select_timeout(self) -> float:
        deadlines = [c.deadline for c in self._conns.values() if c.deadline is not None]
        if not deadlines:
            return 1.0
        return min(1.0, max(0.0, min(deadlines) - time.monotonic()))

    def _accept(self) -> None:
        assert self._listener is not None and self._selector is not None
        for _ in range(64):  # then let the other connections have a turn
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: leave it in the backlog, try at the next wake-up
                logger.warning("ckptbus: cannot accept a socket connection: %s", exc)
                return
            sock.setblocking(False)
            conn = _Conn(sock, time.monotonic() + self.timeout)
            self._conns[sock.fileno()] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)
            uid = self._peer_uid(sock)
            if uid != os.geteuid():
                if uid not in self._refused_uids:
                    self._refused_uids.add(uid)
                    logger.warning(
                        "ckptbus: refused a socket client running as uid %s (only uid %d may ask)", uid, os.geteuid()
                    )
                self._reply(
                    conn, error_reply("forbidden", f"only uid {os.geteuid()} may use this socket; you are uid {uid}")
                )
            elif len(self._conns) > self.max_clients:
                self._reply(conn, error_reply("busy", f"{self.max_clients} clients are connected; try again"))

    @staticmethod
    def _peer_uid(sock: socket.socket) -> int | None:
        try:
            _, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        except OSError:
            return None
        return int(uid)

    def _drain_wake(self) -> None:
        assert self._wake_r is not None
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self._wake_r.recv(4096):
                pass

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(8192)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if conn.state != "reading":
            if not data:  # the client went away (while waiting, or before reading its reply)
                self._drop(conn)
            return  # anything sent after the request line is ignored
        if data:
            conn.rbuf += data
            end = conn.rbuf.find(b"\n")
            if end < 0:
                if len(conn.rbuf) >= MAX_LINE_BYTES:
                    self._reply(
                        conn, error_reply("line_too_long", f"a request line may have at most {MAX_LINE_BYTES} bytes")
                    )
                return
            line = bytes(conn.rbuf[:end])
        else:  # end of input: a last line without its newline still counts
            if not conn.rbuf.strip(_JSON_WHITESPACE):  # nothing sent (or blanks): no request, no reply
                self._drop(conn)
                return
            line = bytes(conn.rbuf)
        conn.rbuf = bytearray()
        self._handle(conn, line)

    def _handle(self, conn: _Conn, line: bytes) -> None:
        try:
            request = parse_request(line)
        except ProtocolError as exc:
            self._reply(conn, error_reply(exc.code, exc.message))
            return
        if isinstance(request, SaveRequest):
            self._save(conn, request)
        else:
            self._reply(conn, ok_reply("status", status=self._status_snapshot()))

    def _save(self, conn: _Conn, request: SaveRequest) -> None:
        request_id, shared = self._find_outstanding(request)
        if request_id is None:
            if len(self._outstanding) >= MAX_OUTSTANDING:
                self._reply(conn, error_reply("busy", f"{MAX_OUTSTANDING} socket requests are pending; try again"))
                return
            event = SaveRequested(kind=request.kind, reason="socket", label=request.label)
            request_id = event.request_id
            self._outstanding[request_id] = (request.kind, request.label)
            self.bus.publish(event)  # receivers only enqueue (the coordinator), or append to the event log
        accepted = ok_reply(
            "save", state="queued", request_id=request_id, kind=request.kind, label=request.label, shared=shared
        )
        if not request.wait:
            self._reply(conn, accepted)
            return
        self._send(conn, accepted)
        conn.state = "waiting"
        conn.deadline = None
        conn.request_id = request_id
        self._waiting.setdefault(request_id, []).append(conn)

    def _find_outstanding(self, request: SaveRequest) -> tuple[str | None, bool]:
        """A pending socket request that serves ``request`` too: same kind or full, and the same label (or none)."""
        for request_id, (kind, label) in self._outstanding.items():
            if (kind == request.kind or kind == "full") and request.label in (None, label):
                return request_id, True
        return None, False

    def _status_snapshot(self) -> dict[str, Any]:
        run: dict[str, Any] = {}
        if self._status is not None:
            try:
                run = dict(self._status())
            except Exception as exc:  # status is best effort; the socket must answer
                logger.debug("ckptbus: status provider failed", exc_info=exc)
                run = {"error": f"{type(exc).__name__}: {exc}"}
        return {
            **run,
            "output_dir": str(self.output_dir.resolve()),
            "pid": os.getpid(),
            "socket": str(self.path),
            "protocol": PROTOCOL_VERSION,
            "socket_clients": len(self._conns),
            "socket_requests": [
                {"request_id": rid, "kind": kind, "label": label, "waiting": len(self._waiting.get(rid, ()))}
                for rid, (kind, label) in self._outstanding.items()
            ],
        }

    def _deliver_outcomes(self) -> None:
        while True:
            try:
                event = self._outcomes.get_nowait()
            except queue.Empty:
                return
            for request_id in event.request_ids:
                if self._outstanding.pop(request_id, None) is None:
                    continue
                reply = _outcome_reply(request_id, event)
                for conn in self._waiting.pop(request_id, []):
                    if conn.sock.fileno() in self._conns:
                        self._reply(conn, reply)

    def _expire(self, now: float) -> None:
        for conn in list(self._conns.values()):
            if conn.deadline is None or now < conn.deadline:
                continue
            if conn.state == "reading":
                self._reply(conn, error_reply("timeout", f"no complete request line within {self.timeout:g} s"))
            else:  # a client that does not read its reply
                self._drop(conn)

    # -- replies ----------------------------------------------------------------

    def _send(self, conn: _Conn, message: dict[str, Any]) -> None:
        try:
            data = encode(message)
        except ValueError as exc:  # a status value JSON cannot hold (NaN)
            data = encode(error_reply("internal", f"reply could not be encoded: {exc}"))
        conn.wbuf += data
        self._flush(conn)

    def _reply(self, conn: _Conn, message: dict[str, Any]) -> None:
        """Send the last line of this connection, then close it."""
        conn.state = "closing"
        conn.deadline = time.monotonic() + self.timeout
        self._send(conn, message)

    def _flush(self, conn: _Conn) -> None:
        assert self._selector is not None
        while conn.wbuf:
            try:
                sent = conn.sock.send(conn.wbuf)
            except (BlockingIOError, InterruptedError):
                self._selector.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
                return
            except OSError:  # the client went away
                self._drop(conn)
                return
            del conn.wbuf[:sent]
        if conn.state == "closing":
            self._drop(conn)
        else:
            self._selector.modify(conn.sock, selectors.EVENT_READ, conn)

    def _drop(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if fd < 0 or self._conns.get(fd) is not conn:
            return
        del self._conns[fd]
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(conn.sock)
        if conn.request_id is not None:
            waiting = self._waiting.get(conn.request_id, [])
            if conn in waiting:
                waiting.remove(conn)
        # Read what the client sent and we did not (bounded): closing a UNIX socket with
        # unread input makes the client's next read fail with ECONNRESET instead of
        # giving it our last reply.
        with contextlib.suppress(OSError):
            for _ in range(16):
                if not conn.sock.recv(65536):
                    break
        conn.sock.close()


def _outcome_reply(request_id: str, event: SaveCompleted | SaveFailed) -> dict[str, Any]:
    if isinstance(event, SaveCompleted):
        return ok_reply(
            "save",
            state="completed",
            request_id=request_id,
            path=event.path,
            step=event.step,
            kind=event.kind,
            labels=list(event.labels),
            bytes=event.bytes,
            seconds=round(event.seconds, 3),
        )
    return error_reply(
        "save_failed",
        event.error,
        op="save",
        state="failed",
        request_id=request_id,
        step=event.step,
        kind=event.kind,
    )
