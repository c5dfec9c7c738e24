"""The object-store client: one bucket, S3's API through boto3, every byte digested as it crosses.

Why boto3 (docs/remote.md has the figures): it is the reference client,
its transfer manager (s3transfer) uploads and downloads in parallel parts
with retries, and conditional writes (``If-None-Match: *``) are plain
arguments. fsspec/s3fs could not be installed beside this torch (its
aiobotocore pins another botocore), and its writes are not conditional.

What this module adds to boto3:

- every object uploaded is read once, in order, through :class:`_HashingReader`,
  which checks the bytes against the manifest's size and xxh3 digest as they
  are read; a mismatch raises inside the read that returns the last bytes, so
  the transfer fails before S3 completes the object (a multipart upload is
  aborted; a single PUT is never sent);
- every object downloaded is written in order through :class:`_HashingWriter`
  (parts are fetched in parallel and put back in order by s3transfer), so
  its digest is known the moment the last byte lands;
- errors come back as one :class:`ObjectStoreError`, saying in words what is
  wrong (no such bucket, credentials refused, endpoint unreachable) and
  whether trying again later may help (``transient``).

boto3 is imported when a store is first made, never at import time: the CLI
starts without it. This module imports no torch.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ._digest import Digester
from ._errors import CkptbusError
from ._names import PROBE_PREFIX
from ._remote_url import RemoteDir

PART_BYTES: Final = 16 << 20
"""Multipart part size: large enough that per-request overhead vanishes, small enough that ``parallelism`` parts
in memory stay modest (S3 allows 10,000 parts: 160 GB a file at this size; larger files raise it, see
:func:`part_size`)."""

BOTO_ATTEMPTS: Final = 4
"""Attempts of one request inside botocore (standard retry mode: backoff with jitter on throttling, 5xx and
connection errors). Longer outages are the tier's to wait out (plugins/tiers/uploader.py)."""

Progress = Callable[[int], None]
"""Called with a count of bytes each time more have crossed."""


class ObjectStoreError(CkptbusError):
    """An object-store request failed. ``transient``: trying again later may succeed (the endpoint or the network
    was down, the store was busy); otherwise it will fail the same way until someone changes something."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


class DigestMismatch(ObjectStoreError):
    """The bytes of an object do not match the manifest (size or digest): never transient."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=False)


class Cancelled(ObjectStoreError):
    """The transfer was stopped on purpose (a deadline at exit)."""

    def __init__(self) -> None:
        super().__init__("the transfer was cancelled", transient=False)


def part_size(size: int) -> int:
    """The part size for an object of ``size`` bytes: :data:`PART_BYTES`, doubled until 10,000 parts suffice."""
    part = PART_BYTES
    while size > part * 10_000:
        part *= 2
    return part


_TRANSIENT_CODES: Final = frozenset(
    {"RequestTimeout", "SlowDown", "InternalError", "ServiceUnavailable", "Throttling", "RequestTimeTooSkewed"}
)
_CREDENTIAL_CODES: Final = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken", "AllAccessDisabled"}
)


def translate(exc: BaseException, remote: RemoteDir, what: str) -> ObjectStoreError:
    """``exc`` (raised by boto3 while doing ``what``) as an :class:`ObjectStoreError` that says what to do."""
    if isinstance(exc, ObjectStoreError):
        return exc
    from botocore import exceptions as bx

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    if isinstance(exc, bx.NoCredentialsError):
        return ObjectStoreError(
            f"{what} in {remote.url}: no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
            "AWS_PROFILE) for the bucket",
            transient=False,
        )
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectionClosedError, bx.ConnectTimeoutError)):
        return ObjectStoreError(
            f"{what} in {remote.url}: cannot reach the object store at {endpoint} ({exc}); check AWS_ENDPOINT_URL "
            "and the network",
            transient=True,
        )
    if isinstance(exc, (bx.ReadTimeoutError, bx.ResponseStreamingError, bx.IncompleteReadError)):
        return ObjectStoreError(f"{what} in {remote.url}: the connection broke ({exc})", transient=True)
    if isinstance(exc, bx.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code == "NoSuchBucket":
            return ObjectStoreError(
                f"{what}: the bucket {remote.bucket!r} of {remote.url} does not exist at {endpoint}; create it "
                "(aws s3 mb s3://" + remote.bucket + ") or fix remote_dir",
                transient=False,
            )
        if code in _CREDENTIAL_CODES or status == 403:
            return ObjectStoreError(
                f"{what} in {remote.url}: the store refused the credentials ({code or status}: "
                f"{error.get('Message', '')}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and "
                "the bucket's policy",
                transient=False,
            )
        transient = code in _TRANSIENT_CODES or status >= 500
        return ObjectStoreError(
            f"{what} in {remote.url}: {code or status}: {error.get('Message', exc)}", transient=transient
        )
    if isinstance(exc, bx.BotoCoreError):
        return ObjectStoreError(f"{what} in {remote.url}: {exc}", transient=True)
    if isinstance(exc, OSError):
        return ObjectStoreError(f"{what}: {exc.strerror or exc}", transient=False)
    return ObjectStoreError(f"{what} in {remote.url}: {type(exc).__name__}: {exc}", transient=False)


class _HashingReader:
    """A read-only, non-seekable file for s3transfer: the bytes of ``path``, digested in order as they are read.

    Non-seekable on purpose: s3transfer then reads it once, in order, in one
    thread, and keeps each part in memory for its retries, so every byte is
    hashed exactly once. The read that reaches the manifest's size compares
    the digest and raises :class:`DigestMismatch` before returning, so the
    last part is never sent.
    """

    def __init__(self, path: Path, name: str, size: int, digest: str | None, cancel: threading.Event) -> None:
        self._fh = open(path, "rb")  # noqa: SIM115 - closed by close(), after the transfer
        found = os.fstat(self._fh.fileno()).st_size
        if found != size:
            self._fh.close()
            raise DigestMismatch(f"{name} has {found} bytes on disk, the manifest says {size}; not uploaded")
        self._name, self._size, self._digest, self._cancel = name, size, digest, cancel
        self._digester = Digester()
        self._read = 0
        self._checked = False
        if size == 0:
            self._check()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, n: int = -1) -> bytes:
        if self._cancel.is_set():
            raise Cancelled()
        want = self._size - self._read + 1 if n is None or n < 0 else n
        data = self._fh.read(want)
        self._digester.update(data)
        self._read += len(data)
        if self._read > self._size:
            raise DigestMismatch(f"{self._name} grew past the {self._size} bytes of its manifest while uploaded")
        if self._read == self._size:
            self._check()
        elif len(data) < want:
            raise DigestMismatch(f"{self._name} ended at {self._read} bytes, the manifest says {self._size}")
        return data

    def _check(self) -> None:
        if self._checked:
            return
        self._checked = True
        found = self._digester.value()
        if self._digest is not None and found != self._digest:
            raise DigestMismatch(
                f"{self._name} has content digest {found} on disk, the manifest records {self._digest}: the local "
                "file changed since it was written; not uploaded"
            )

    def close(self) -> None:
        self._fh.close()


class _HashingWriter:
    """A write-only, non-seekable file for s3transfer: bytes written to ``fh`` in order, digested as they land."""

    def __init__(self, fh: Any, cancel: threading.Event, progress: Progress | None) -> None:
        self._fh, self._cancel, self._progress = fh, cancel, progress
        self.digester = Digester()
        self.written = 0

    def seekable(self) -> bool:
        return False

    def write(self, data: bytes) -> int:
        if self._cancel.is_set():
            raise Cancelled()
        self._fh.write(data)
        self.digester.update(data)
        self.written += len(data)
        if self._progress is not None:
            self._progress(len(data))
        return len(data)


@dataclass(frozen=True, slots=True)
class Downloaded:
    """What :meth:`ObjectStore.download` wrote: its digest and size, computed from the bytes as they arrived."""

    digest: str
    bytes: int


class ObjectStore:
    """One bucket (and prefix) of an S3 API, for the tier, resume and the CLI.

    Endpoint, region and credentials come from boto3's standard sources
    (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
    ``AWS_PROFILE``, ``AWS_DEFAULT_REGION``, the shared config files).
    ``parallelism``: parts (and files) in flight at once. Every method raises
    :class:`ObjectStoreError` for a failed request. Thread-safe (boto3 clients
    are); :meth:`cancel` makes transfers in progress fail soon with
    :class:`Cancelled`.
    """

    def __init__(self, remote: RemoteDir, *, parallelism: int = 8, attempts: int = BOTO_ATTEMPTS) -> None:
        import boto3
        from botocore.config import Config

        self.remote = remote
        self.parallelism = parallelism
        self._cancel = threading.Event()
        config = Config(
            retries={"max_attempts": attempts, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
            max_pool_connections=max(10, parallelism * 2),
        )
        try:
            self.client: Any = boto3.session.Session().client("s3", config=config)
        except Exception as exc:  # a malformed endpoint URL, a profile that does not exist
            raise translate(exc, remote, "cannot create a client") from None

    def cancel(self) -> None:
        self._cancel.set()

    def close(self) -> None:
        self.client.close()

    def _transfer_config(self, size: int) -> Any:
        from boto3.s3.transfer import TransferConfig

        part = part_size(size)
        return TransferConfig(
            multipart_threshold=part, multipart_chunksize=part, max_concurrency=self.parallelism, use_threads=True
        )

    # -- writing ------------------------------------------------------------------------------------------

    def probe(self) -> None:
        """Write and delete a small object below the prefix: the credentials, the bucket and the endpoint work
        for what the tier does. Raises :class:`ObjectStoreError` saying which is wrong."""
        key = self.remote.key(f"{PROBE_PREFIX}{uuid.uuid4().hex}")
        try:
            self.client.put_object(Bucket=self.remote.bucket, Key=key, Body=b"ckptbus probe\n")
            self.client.delete_object(Bucket=self.remote.bucket, Key=key)
        except Exception as exc:
            raise translate(exc, self.remote, "cannot write a probe object") from None

    def upload(
        self, path: Path, key: str, *, name: str, size: int, digest: str | None, progress: Progress | None
    ) -> None:
        """Upload the file ``path`` to ``key`` in parallel parts, checking its bytes against ``size`` and ``digest``
        as they are read (:class:`_HashingReader`). Raises :class:`DigestMismatch` (nothing is completed in the
        bucket), :class:`Cancelled` or :class:`ObjectStoreError`."""
        try:
            reader = _HashingReader(path, name, size, digest, self._cancel)
        except OSError as exc:
            raise ObjectStoreError(f"{name} cannot be read for upload: {exc.strerror}", transient=False) from None
        try:
            self.client.upload_fileobj(
                reader, self.remote.bucket, key, Config=self._transfer_config(size), Callback=progress
            )
        except Exception as exc:
            raise translate(exc, self.remote, f"cannot upload {name}") from None
        finally:
            reader.close()

    def put_if_absent(self, key: str, body: bytes) -> bool:
        """Write ``body`` to ``key`` only if no object is there (``If-None-Match: *``): True if written, False if
        an object was there already (412)."""
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.remote.bucket, Key=key, Body=body, IfNoneMatch="*")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise translate(exc, self.remote, f"cannot write {key}") from None
        except Exception as exc:
            raise translate(exc, self.remote, f"cannot write {key}") from None
        return True

    def delete(self, keys: list[str]) -> None:
        """Delete ``keys`` (a thousand a request); keys already gone are fine."""
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            try:
                reply = self.client.delete_objects(Bucket=self.remote.bucket, Delete={"Objects": batch, "Quiet": True})
            except Exception as exc:
                raise translate(exc, self.remote, "cannot delete objects") from None
            errors = reply.get("Errors") or []
            if errors:
                first = errors[0]
                raise ObjectStoreError(
                    f"cannot delete {first.get('Key')} in {self.remote.url}: {first.get('Code')}: "
                    f"{first.get('Message')}",
                    transient=True,
                )

    # -- reading ------------------------------------------------------------------------------------------

    def get(self, key: str, *, limit: int) -> bytes | None:
        """The bytes of the object ``key`` (at most ``limit`` + 1 read), or None if there is none."""
        from botocore.exceptions import ClientError

        try:
            reply = self.client.get_object(Bucket=self.remote.bucket, Key=key)
            with reply["Body"] as body:
                return bytes(body.read(limit + 1))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise translate(exc, self.remote, f"cannot read {key}") from None
        except Exception as exc:
            raise translate(exc, self.remote, f"cannot read {key}") from None

    def objects(self, prefix: str) -> dict[str, int]:
        """Every object below ``prefix``: ``{key: size}``."""
        found: dict[str, int] = {}
        for page in self._pages(Prefix=prefix):
            for item in page.get("Contents") or []:
                found[str(item["Key"])] = int(item["Size"])
        return found

    def folders(self, prefix: str) -> list[str]:
        """The "folders" right below ``prefix`` (a prefix ending in ``/``): their names, without the ``/``."""
        names: list[str] = []
        for page in self._pages(Prefix=prefix, Delimiter="/"):
            for item in page.get("CommonPrefixes") or []:
                names.append(str(item["Prefix"])[len(prefix) :].rstrip("/"))
        return names

    def _pages(self, **kwargs: str) -> Iterator[dict[str, Any]]:
        try:
            yield from self.client.get_paginator("list_objects_v2").paginate(Bucket=self.remote.bucket, **kwargs)
        except Exception as exc:
            raise translate(exc, self.remote, "cannot list objects") from None

    def download(self, key: str, fh: Any, *, size: int, progress: Progress | None) -> Downloaded:
        """Write the object ``key`` into the open file ``fh`` in order (parts fetched in parallel), digesting
        the bytes as they arrive. Raises :class:`ObjectStoreError` (no such object: not transient)."""
        writer = _HashingWriter(fh, self._cancel, progress)
        try:
            self.client.download_fileobj(self.remote.bucket, key, writer, Config=self._transfer_config(size))
        except Exception as exc:
            raise translate(exc, self.remote, f"cannot download {key}") from None
        return Downloaded(writer.digester.value(), writer.written)


__all__ = [
    "BOTO_ATTEMPTS",
    "PART_BYTES",
    "Cancelled",
    "DigestMismatch",
    "Downloaded",
    "ObjectStore",
    "ObjectStoreError",
    "Progress",
    "part_size",
    "translate",
]
