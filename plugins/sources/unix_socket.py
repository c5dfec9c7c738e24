"""UNIX socket trigger: ``ckptbus request`` asks the running job for a checkpoint and gets the path back.

One thread on the main process runs an asyncio event loop that serves
``<output_dir>/ckptbus.sock`` (see :mod:`ckptbus._socket_path` for the path
and its fallback, and ``docs/socket.md`` for the protocol). The thread only
records: a ``save`` request is published as ``SaveRequested(reason="socket")``
and the ranks vote on it at the next due step; the reply is sent when
``save_completed`` or ``save_failed`` names the request (the training thread
hands those to the loop with ``call_soon_threadsafe``). Nothing here saves or
calls a collective. Which requests are outstanding and who waits for them is
kept apart from the I/O, in :mod:`.socket_requests`.

Bad clients cannot hurt training: at most ``max_clients`` connections are
open (more get a ``busy`` reply and are closed); a client has ``timeout``
seconds to send its line (``asyncio.wait_for``), which the stream reader's
limit keeps within the protocol's size; a client that does not read its
replies is cut off after ``timeout`` seconds (``drain()``); a client that goes
away is forgotten. A client that only shut down its sending side still gets
every reply. A client running as another user is refused (``SO_PEERCRED``),
beside the socket's mode 0600.

Connections are accepted one at a time (``loop.sock_accept``) and each served
one gets its streams from ``asyncio.open_unix_connection(sock=...)``, so one
too many is answered and closed the moment it is accepted.
``asyncio.start_unix_server`` accepts a whole backlog in one go and builds
every connection's transport a few loop turns later: under a flood all of
them were open at once, far beyond ``max_clients``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
import struct
import threading
from pathlib import Path
from typing import Any, Final

from ckptbus import Bus, SaveCompleted, SaveFailed
from ckptbus._errors import CkptbusError
from ckptbus._protocol import (
    MAX_REQUEST_BYTES,
    PROTOCOL_VERSION,
    ProtocolError,
    Request,
    SaveRequest,
    encode,
    error_reply,
    is_blank,
    line_too_long,
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
from ckptbus._source import RunInfo, StatusProvider

from .socket_requests import MAX_OUTSTANDING, SocketRequests

logger = logging.getLogger("ckptbus")

DEFAULT_TIMEOUT: Final = 10.0
DEFAULT_MAX_CLIENTS: Final = 64
_CLOSE_FLUSH_SECONDS: Final = 1.0
_JOIN_SECONDS: Final = 10.0
_UCRED: Final = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}

Reply = dict[str, Any]

__all__ = ["DEFAULT_MAX_CLIENTS", "DEFAULT_TIMEOUT", "MAX_OUTSTANDING", "UnixSocketTrigger"]


class _Client:
    """One served connection's streams."""

    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer


class UnixSocketTrigger:
    """Serves save and status requests on a UNIX socket. See the module docstring.

    ``path``: the socket path (absolute, or relative to the run's output_dir;
    None: ``<output_dir>/ckptbus.sock``). ``timeout``: seconds a client has to
    send its request line, and to read a reply. ``max_clients``: connections
    served at once. :meth:`start` serves on the main process only; if the
    socket cannot be bound it logs an error and training goes on without it
    (:attr:`path` stays None).
    """

    reason: Final = "socket"
    urgent: Final = False
    """Its requests wait for the next vote: every ``check_interval`` steps (every step while signals are handled)."""

    def __init__(
        self, *, path: str | None = None, timeout: float = DEFAULT_TIMEOUT, max_clients: int = DEFAULT_MAX_CLIENTS
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if max_clients < 1:
            raise ValueError(f"max_clients must be at least 1, got {max_clients!r}")
        self.configured_path = path
        self.timeout = timeout
        self.max_clients = max_clients
        self.bus = Bus()
        self.output_dir = Path()
        """The run's output directory, once started."""
        self.path: Path | None = None
        """Where the socket is bound, once :meth:`start` succeeded."""
        self._status: StatusProvider = dict  # until started: an empty snapshot
        self._pointer = False
        self._bound: os.stat_result | None = None
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = asyncio.Event()
        # Owned by the server's thread:
        self._requests: SocketRequests[asyncio.Future[Reply]] = SocketRequests(reason=self.reason)
        self._clients: set[asyncio.Task[None]] = set()
        self._reading: set[asyncio.Task[None]] = set()
        """Clients still reading their request line: stopping drops them at once."""
        self._refused_uids: set[int | None] = set()
        self._subscriptions = contextlib.ExitStack()  # the bus receivers start connected, cancelled by close

    # -- TriggerSource ----------------------------------------------------------

    def start(self, bus: Bus, run: RunInfo) -> None:
        """Bind the socket and start the server thread; on ranks other than 0, nothing."""
        if not run.is_main_process or self._thread is not None:
            return
        self.bus, self.output_dir, self._status = bus, Path(run.output_dir), run.status
        try:
            self._bind()
        except (CkptbusError, OSError) as exc:
            self._release()
            self.path = None
            logger.error("ckptbus: the socket trigger is off: %s", exc)
            return
        self._requests = SocketRequests(reason=self.reason)
        self._stopping = asyncio.Event()
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(_log_loop_error)
        for name in ("save_completed", "save_failed"):
            self._subscriptions.enter_context(self.bus.subscribe(name, self._on_outcome))
        self._thread = threading.Thread(target=self._run, args=(self._loop,), name="ckptbus-socket", daemon=True)
        self._thread.start()
        logger.info(
            "ckptbus: serving checkpoint requests on %s (ckptbus request --output-dir %s)", self.path, self.output_dir
        )

    def poll(self, step: int) -> None:
        """Nothing to do at a step: requests arrive on the socket thread."""

    def close(self) -> None:
        """Answer what can be answered, stop the thread, remove the socket. Safe to call twice."""
        thread, self._thread = self._thread, None
        loop = self._loop
        if thread is None or loop is None:
            return
        # Queued behind every outcome published before: those are answered first.
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server already failed
            loop.call_soon_threadsafe(self._stopping.set)
        thread.join(timeout=_JOIN_SECONDS)
        if thread.is_alive():  # never seen; the thread is a daemon and will not keep the process alive
            logger.error("ckptbus: the socket thread did not stop within %g s", _JOIN_SECONDS)
            return
        self._subscriptions.close()
        self._release()
        loop.close()
        self._loop = None

    # -- the training thread ------------------------------------------------------

    def _on_outcome(self, event: SaveCompleted | SaveFailed) -> None:
        """Bus receiver (training thread): hand the outcome to the server's loop; nothing else."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to answer
                loop.call_soon_threadsafe(self._settle, event)

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

    def _release(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self.path is not None and self._bound is not None:
            remove_socket(self.path, self._bound)
        if self.path is not None and self._pointer:
            remove_pointer(self.output_dir, self.path)
            self._pointer = False
        self._bound = None

    # -- the server thread ------------------------------------------------------

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            loop.run_until_complete(self._serve())
        except Exception:
            logger.exception("ckptbus: the socket server failed; socket requests are off, training continues")
            # Clients now get "connection refused" at once instead of waiting in a backlog nobody serves.
            self._release()

    async def _serve(self) -> None:
        listener = self._listener
        assert listener is not None
        accepting = asyncio.ensure_future(self._accept(listener))
        stopping = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait((accepting, stopping), return_when=asyncio.FIRST_COMPLETED)
        for task in (accepting, stopping):
            task.cancel()
        await asyncio.gather(accepting, stopping, return_exceptions=True)
        listener.close()  # no new connections: a client now gets "connection refused" at once
        await self._finish()
        if not accepting.cancelled():
            accepting.result()  # the accept loop ended by itself: it failed, and _run logs why

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE and friends: leave the rest in the backlog a while, as asyncio does
                logger.warning("ckptbus: cannot accept a socket connection: %s", exc)
                await asyncio.sleep(1.0)
                continue
            refusal = self._refusal(conn)
            if refusal is not None:
                _refuse(conn, refusal)
                continue
            task = asyncio.ensure_future(self._serve_client(conn))
            for tasks in (self._clients, self._reading):
                tasks.add(task)
                task.add_done_callback(tasks.discard)

    async def _finish(self) -> None:
        """Stopping: tell the waiting clients, give replies on their way a moment, drop the rest."""
        for request_id, waiters in self._requests.abandon():
            reply = error_reply(
                "shutting_down",
                "the training run is ending; the request was not served",
                op="save",
                state="failed",
                request_id=request_id,
            )
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(reply)
        for task in list(self._reading):
            task.cancel()
        tasks = list(self._clients)
        if tasks:
            await asyncio.wait(tasks, timeout=_CLOSE_FLUSH_SECONDS)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _settle(self, event: SaveCompleted | SaveFailed) -> None:
        for request_id, waiters in self._requests.settle(event):
            reply = _outcome_reply(request_id, event)
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(reply)

    # -- one connection -----------------------------------------------------------

    async def _serve_client(self, conn: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(sock=conn, limit=MAX_REQUEST_BYTES)
        except BaseException:
            conn.close()
            raise
        try:
            await self._converse(_Client(reader, writer))
        except (OSError, asyncio.TimeoutError):
            pass  # the client went away, or did not read its reply in time: forgotten
        except Exception:
            logger.exception("ckptbus: serving a socket client failed; the run goes on")
            with contextlib.suppress(Exception):
                writer.write(encode(error_reply("internal", "the server failed; see the training log")))
        finally:
            # A reply already flushed is not lost; one stuck behind a client that does not read is.
            writer.transport.abort()

    async def _converse(self, client: _Client) -> None:
        request: Request | ProtocolError | None
        try:
            request = await self._read_request(client.reader)
        except ProtocolError as exc:
            request = exc
        self._reading.discard(asyncio.current_task())
        if request is None:  # the client ended without asking anything: no reply
            await self._close(client)
        elif isinstance(request, ProtocolError):
            await self._reply(client, error_reply(request.code, request.message))
        elif isinstance(request, SaveRequest):
            await self._save(client, request)
        else:
            await self._reply(client, ok_reply("status", status=self._status_snapshot()))

    def _refusal(self, conn: socket.socket) -> Reply | None:
        """Why a connection just accepted is not served (another user, too many clients), or None."""
        uid = _peer_uid(conn)
        if uid != os.geteuid():
            if uid not in self._refused_uids:
                self._refused_uids.add(uid)
                logger.warning(
                    "ckptbus: refused a socket client running as uid %s (only uid %d may ask)", uid, os.geteuid()
                )
            return error_reply("forbidden", f"only uid {os.geteuid()} may use this socket; you are uid {uid}")
        if len(self._clients) >= self.max_clients:
            return error_reply("busy", f"{self.max_clients} clients are connected; try again")
        return None

    async def _read_request(self, reader: asyncio.StreamReader) -> Request | None:
        """The client's request, or None if it ended its input having sent nothing.

        Raises :class:`ProtocolError` with the code to answer: a line that is
        not a request, too long, or not complete within the timeout.
        """
        try:
            line = await asyncio.wait_for(reader.readuntil(b"\n"), self.timeout)
        except asyncio.TimeoutError:
            raise ProtocolError("timeout", f"no complete request line within {self.timeout:g} s") from None
        except asyncio.LimitOverrunError:
            raise line_too_long() from None
        except asyncio.IncompleteReadError as exc:  # end of input: a last line without its newline still counts
            if is_blank(exc.partial):
                return None
            line = exc.partial
        return parse_request(line)

    async def _save(self, client: _Client, request: SaveRequest) -> None:
        admitted = self._requests.admit(request)
        if admitted is None:
            await self._reply(client, error_reply("busy", f"{MAX_OUTSTANDING} socket requests are pending; try again"))
            return
        if admitted.publish is not None:
            self.bus.publish(admitted.publish)  # receivers only enqueue (the coordinator), or append to the event log
        queued = ok_reply(
            "save",
            state="queued",
            request_id=admitted.request_id,
            kind=request.kind,
            label=request.label,
            shared=admitted.shared,
        )
        if not request.wait:
            await self._reply(client, queued)
            return
        outcome: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._requests.wait(admitted.request_id, outcome)
        try:
            await self._send(client, queued)
            reply = await self._outcome_unless_gone(client, outcome)
        finally:
            self._requests.leave(admitted.request_id, outcome)
        if reply is None:
            return  # the client left; its request is still saved
        await self._reply(client, reply)

    async def _outcome_unless_gone(self, client: _Client, outcome: asyncio.Future[Reply]) -> Reply | None:
        """The outcome's reply, or None as soon as the client closed its end (one that only stopped sending waits)."""
        left = asyncio.ensure_future(_until_closed(client))
        try:
            await asyncio.wait((outcome, left), return_when=asyncio.FIRST_COMPLETED)
        finally:
            left.cancel()
        if outcome.done():
            return outcome.result()
        if left.result():
            return None
        return await outcome

    def _status_snapshot(self) -> dict[str, Any]:
        run: dict[str, Any]
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
            "socket_clients": len(self._clients),
            "socket_requests": self._requests.snapshot(),
        }

    # -- replies ----------------------------------------------------------------

    async def _send(self, client: _Client, message: Reply) -> None:
        """Send one line; raises ``asyncio.TimeoutError`` if the client does not take it within the timeout."""
        client.writer.write(_encode(message))
        await asyncio.wait_for(client.writer.drain(), self.timeout)

    async def _reply(self, client: _Client, message: Reply) -> None:
        """Send the last line of this connection, then close it."""
        await self._send(client, message)
        await self._close(client)

    async def _close(self, client: _Client) -> None:
        client.writer.close()
        await asyncio.wait_for(client.writer.wait_closed(), self.timeout)


async def _until_closed(client: _Client) -> bool:
    """Read (and ignore) what the client sends after its request until its input ends.

    True if it closed its end entirely (or the connection broke); False if it
    only shut down its sending side and still reads (``printf ... | socat``).
    """
    try:
        while await client.reader.read(64 * 1024):
            pass  # anything sent after the request line is ignored
    except OSError:  # the connection broke
        return True
    return _peer_hung_up(client.writer.get_extra_info("socket"))


def _peer_hung_up(sock: Any) -> bool:
    """Whether the peer closed its end entirely: POLLHUP, which a peer that only stopped sending does not raise."""
    poller = select.poll()
    poller.register(sock.fileno(), 0)  # POLLHUP and POLLERR are reported whatever the mask asks for
    return any(events & (select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))


def _refuse(conn: socket.socket, reply: Reply) -> None:
    """Answer a connection that is not served and close it now: a fresh socket's buffer takes a reply line."""
    with conn:
        with contextlib.suppress(OSError):
            conn.send(_encode(reply))
        with contextlib.suppress(OSError):
            # What the client already sent: closing with it unread would reset the connection under our reply.
            conn.recv(64 * 1024)


def _peer_uid(sock: socket.socket) -> int | None:
    """The client's uid; None where the system does not say (no ``SO_PEERCRED``: every client is refused)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    try:
        _, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, option, _UCRED.size))
    except OSError:
        return None
    return int(uid)


def _encode(message: Reply) -> bytes:
    try:
        return encode(message)
    except ValueError as exc:  # a status value JSON cannot hold (NaN)
        return encode(error_reply("internal", f"reply could not be encoded: {exc}"))


def _log_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's own errors (``accept()`` out of descriptors, say) go to ckptbus's log: the server goes on."""
    logger.warning("ckptbus: socket server: %s", context.get("message"), exc_info=context.get("exception"))


def _outcome_reply(request_id: str, event: SaveCompleted | SaveFailed) -> Reply:
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
