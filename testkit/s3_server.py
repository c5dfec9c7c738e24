"""A real S3 API on 127.0.0.1 for tests and benchmarks: moto's server, in this process, on a free port.

moto serves S3's HTTP API (conditional writes answer 412, multipart objects
stay invisible until completed, credentials are checked once authentication
is switched on); it does not validate checksums, so ckptbus's own digests are
what catches damage. A :class:`S3Server` can be stopped and started again on
the same port (the endpoint going away mid-run), and keeps its buckets across
that while the process lives (moto's state is per process).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from typing import Any

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


def _severing_server(connections: set[Any]) -> Any:
    """moto's ``ThreadedMotoServer``, whose request handlers register their connections in ``connections``, so
    that :meth:`S3Server.stop` can cut them: stopping moto's server alone closes its listening socket, while
    kept-alive connections would go on being served by their threads (no outage a client would see)."""
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    class Handler(MotoRequestHandler):  # type: ignore[misc]
        def setup(self) -> None:
            super().setup()
            connections.add(self.connection)

        def finish(self) -> None:
            connections.discard(self.connection)
            super().finish()

    class Server(ThreadedMotoServer):  # type: ignore[misc]
        def _server_entry(self) -> None:
            app = DomainDispatcherApplication(create_backend_app)
            self._server = make_server(self._ip_address, self._port, app, True, request_handler=Handler)
            self._server_ready_event.set()
            self._server.serve_forever()

    return Server


class S3Server:
    """moto's ``ThreadedMotoServer`` on 127.0.0.1; :attr:`endpoint` is its URL."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self._server: Any = None
        self._connections: set[Any] = set()

    def start(self) -> S3Server:
        """Serve (again, on the same port after :meth:`stop`: moto's buckets live as long as this process)."""
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self._server = _severing_server(self._connections)(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.port = int(self._server.get_host_and_port()[1])
        return self

    def stop(self) -> None:
        """Go away as a killed server does: the port closes and every open connection is cut."""
        if self._server is None:
            return
        self._server.stop()
        self._server._server.server_close()
        for connection in list(self._connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self._server = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment a client (or a training run) needs to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            **extra,
        }

    def client(self, **overrides: str) -> Any:
        import boto3

        env = self.env(**overrides)
        return boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=REGION,
        )

    def new_bucket(self) -> str:
        name = f"ckpt-{uuid.uuid4().hex[:12]}"
        client = self.client()
        client.create_bucket(Bucket=name)
        client.close()
        return name


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` updated with ``values`` inside, restored after (boto3 reads its settings from there)."""
    keys = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_PROFILE")
    saved = {k: os.environ.get(k) for k in {*keys, *values}}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def authentication() -> Iterator[None]:
    """moto checks credentials inside (it accepts any until this switches its authentication on; off again after):
    a key pair it never issued is refused with 403 InvalidAccessKeyId, as S3 refuses it."""
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    before = settings.INITIAL_NO_AUTH_ACTION_COUNT
    try:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = ActionAuthenticatorMixin.request_count
        yield
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = before


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
