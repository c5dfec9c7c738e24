"""The object-storage tier: committed checkpoints uploaded by a background thread, drained at exit with a deadline.

The runtime (plugins/runtime.py) makes one on the main process when
``remote_dir`` is set, and calls it at four points only:

- :meth:`RemoteTier.start` at start-up: a probe object is written and
  deleted, so a missing bucket, refused credentials or an unreachable
  endpoint stop the run before training (:class:`~ckptbus.SetupError`);
- :meth:`RemoteTier.submit` after each local commit: the checkpoint is
  queued; training never waits for it;
- :meth:`RemoteTier.unfinished` at local rotation: checkpoints whose upload
  is not complete are kept on disk;
- :meth:`RemoteTier.drain` at the end: uploads still queued or running get
  until the deadline (``remote.exit_deadline_seconds``), and the returned
  line says whether the last checkpoint is safe in the bucket or what is
  missing.

One thread, fed by a queue (``None`` stops it), has the checkpoints uploaded
in commit order (ckptbus/_remote_checkpoints.py: objects first, manifest
last, each byte checked against the manifest) by a process of its own
(plugins/tiers/upload_worker.py), which shares no GIL with training; at the
deadline that process is killed, which leaves nothing complete in the bucket
that was not complete before. A transient failure (the endpoint
gone, the store busy) is retried with backoff for as long as the run lives
and logged once per outage; training goes on, nothing local is deleted
meanwhile. After each upload the bucket is rotated (``remote.keep``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Final

from ckptbus import SetupError
from ckptbus._config import RemoteConfig
from ckptbus._layout import CheckpointInfo
from ckptbus._object_store import ObjectStore, ObjectStoreError
from ckptbus._remote_url import RemoteDir, parse_remote

logger = logging.getLogger("ckptbus")

BACKOFF_SECONDS: Final = (1.0, 2.0, 5.0, 10.0, 30.0)
"""Waits between tries of one checkpoint after a transient failure (the last one repeats)."""


@dataclass(frozen=True, slots=True)
class _Done:
    url: str
    bytes: int
    seconds: float
    already: bool


@dataclass(slots=True)
class _Upload:
    info: CheckpointInfo
    sent: int = 0
    tries: int = 0
    error: str | None = None


class _Stopped(Exception):
    """The tier stopped (the deadline at exit) while the worker was busy."""


class _Worker:
    """The upload process (plugins/tiers/upload_worker.py), started on first use and again after it died."""

    def __init__(self, url: str, config: RemoteConfig, stop: threading.Event) -> None:
        self._argv = [
            sys.executable,
            "-m",
            "ckptbus.plugins.tiers.upload_worker",
            url,
            str(config.parallelism),
            "none" if config.keep is None else str(config.keep),
        ]
        self._stop = stop
        self._proc: subprocess.Popen[str] | None = None

    def call(self, request: dict[str, object], on_sent: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Send ``request``; return the answer (progress lines go to ``on_sent``). Raises :class:`_Stopped` once
        the tier stops, :class:`ObjectStoreError` (transient) if the process ended without answering."""
        proc = self._started()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps(request) + "\n")
            proc.stdin.flush()
        except OSError:
            self.close()
            raise ObjectStoreError("the upload process ended; it is started again", transient=True) from None
        while True:
            while not select.select([proc.stdout], [], [], 0.2)[0]:
                if self._stop.is_set():
                    raise _Stopped()
            line = proc.stdout.readline()
            if not line:
                self.close()
                raise ObjectStoreError("the upload process ended; it is started again", transient=True)
            answer: dict[str, Any] = json.loads(line)
            if "sent" in answer:
                if on_sent is not None:
                    on_sent(int(answer["sent"]))
                continue
            return answer

    def _started(self) -> subprocess.Popen[str]:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
            )
        return self._proc

    def close(self) -> None:
        """End the process: at once (it may be mid-upload; the bucket then holds no manifest for it)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class RemoteTier:
    """Uploads of one run's committed checkpoints to ``remote_dir``. See the module docstring.

    Thread-safe where it says so: :meth:`status` and :meth:`unfinished` may be
    called from any thread; the others from the training thread.
    """

    def __init__(self, remote_dir: str, config: RemoteConfig) -> None:
        self.remote: RemoteDir = parse_remote(remote_dir)
        self.config = config
        self._queue: queue.Queue[_Upload | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting: list[_Upload] = []  # queued or in flight, oldest first
        self._failed: dict[Path, str] = {}  # gave up on these (not transient): kept on disk, named at the end
        self._done: list[tuple[int, str]] = []  # (step, url) complete in the bucket, oldest first
        self._last_throughput: float | None = None
        self._last_seconds: float | None = None
        self._outage: str | None = None
        self._stop = threading.Event()
        self._worker = _Worker(remote_dir, config, self._stop)
        self._idle = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    # -- start ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Probe the bucket (write and delete an object) and start the upload thread. Raises
        :class:`~ckptbus.SetupError` in one line naming what is wrong (bucket, credentials, endpoint, boto3)."""
        try:
            store = ObjectStore(self.remote, parallelism=self.config.parallelism)
        except ImportError:
            raise SetupError(
                f"remote_dir {self.remote.url} needs boto3, which is not installed: pip install 'ckptbus[s3]'"
            ) from None
        except ObjectStoreError as exc:
            raise SetupError(f"remote_dir {self.remote.url}: {exc}") from None
        try:
            store.probe()
        except ObjectStoreError as exc:
            store.close()
            raise SetupError(f"remote_dir: {exc}") from None
        store.close()  # the uploads run in a process of their own (_Worker)
        self._thread = threading.Thread(target=self._run, name="ckptbus-uploader", daemon=True)
        self._thread.start()

    # -- the training thread's calls --------------------------------------------------------------------

    def submit(self, info: CheckpointInfo) -> None:
        """Queue the committed checkpoint ``info`` for upload; returns at once."""
        upload = _Upload(info)
        with self._lock:
            self._waiting.append(upload)
        self._queue.put(upload)

    def unfinished(self) -> set[Path]:
        """Local checkpoints whose upload is not complete (queued, in flight, or given up on): rotation keeps them."""
        with self._lock:
            return {u.info.path for u in self._waiting} | set(self._failed)

    def drain(self, deadline_seconds: float | None = None) -> str:
        """Wait until every queued upload ended or ``deadline_seconds`` (default: the config's) passed, stop the
        thread, and return the line to log last: the newest checkpoint safe in the bucket, or what is not."""
        if self._thread is None:
            return ""
        deadline = self.config.exit_deadline_seconds if deadline_seconds is None else deadline_seconds
        with self._lock:
            busy = bool(self._waiting)
        if busy:
            logger.info("ckptbus: waiting up to %.0f s for uploads to %s to finish", deadline, self.remote.url)
        interrupted = False
        end = time.monotonic() + deadline
        with _SignalsNoted() as noted:
            try:
                with self._idle:
                    while self._waiting and (left := end - time.monotonic()) > 0:
                        self._idle.wait(min(left, 1.0))
            except KeyboardInterrupt:
                interrupted = True  # a second Ctrl+C: stop waiting
        for name in noted.seen:
            logger.warning("ckptbus: %s arrived while uploads were finishing; they had until the deadline", name)
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout=30.0)
        self._thread = None
        self._worker.close()
        return self._summary(deadline, interrupted)

    # -- status -----------------------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        """The upload backlog for ``ckptbus status``: safe from any thread."""
        with self._lock:
            waiting = list(self._waiting)
            return {
                "remote_dir": self.remote.url,
                "queued": [u.info.step for u in waiting[1:]],
                "in_flight": waiting[0].info.step if waiting else None,
                "in_flight_bytes_sent": waiting[0].sent if waiting else None,
                "failed": {str(p): why for p, why in self._failed.items()},
                "retrying": waiting[0].error if waiting and waiting[0].error else None,
                "last_uploaded": self._done[-1][1] if self._done else None,
                "last_upload_seconds": self._last_seconds,
                "last_upload_bytes_per_second": self._last_throughput,
            }

    # -- the upload thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            upload = self._queue.get()
            if upload is None:
                return
            if not self._upload(upload):
                return  # stopped at the deadline: it stays among the missing
            with self._idle:
                self._waiting.remove(upload)
                self._idle.notify_all()

    def _upload(self, upload: _Upload) -> bool:
        """Upload until it is complete in the bucket or failed for good (True), or the tier stops (False)."""
        while not self._stop.is_set():
            upload.tries += 1
            upload.sent = 0
            try:
                answer = self._worker.call({"upload": str(upload.info.path)}, lambda n: self._sent(upload, n))
                if "error" in answer:
                    raise ObjectStoreError(str(answer["error"]), transient=bool(answer["transient"]))
            except _Stopped:
                return False
            except ObjectStoreError as exc:
                if self._stop.is_set():
                    return False
                if not exc.transient:
                    logger.error("ckptbus: upload of %s to %s failed: %s", upload.info.path, self.remote.url, exc)
                    with self._lock:
                        self._failed[upload.info.path] = str(exc)
                    return True
                wait = BACKOFF_SECONDS[min(upload.tries - 1, len(BACKOFF_SECONDS) - 1)]
                with self._lock:
                    upload.error = str(exc)
                    first = self._outage is None
                    self._outage = str(exc)
                if first:
                    logger.warning(
                        "ckptbus: upload of %s is retried (training goes on, nothing local is deleted): %s",
                        upload.info.path.name,
                        exc,
                    )
                self._stop.wait(wait)
                continue
            done = _Done(str(answer["done"]), int(answer["bytes"]), float(answer["seconds"]), bool(answer["already"]))
            with self._lock:
                if self._outage is not None:
                    logger.info("ckptbus: %s reachable again; uploads go on", self.remote.url)
                self._outage = None
                upload.error = None
                self._done.append((upload.info.step, done.url))
                if not done.already:
                    self._last_seconds = done.seconds
                    self._last_throughput = done.bytes / done.seconds if done.seconds > 0 else None
            logger.info(
                "ckptbus: uploaded %s to %s (%d bytes in %.2f s)",
                upload.info.path.name,
                done.url,
                done.bytes,
                done.seconds,
            )
            self._rotate()
            return True
        return False

    def _sent(self, upload: _Upload, count: int) -> None:
        upload.sent = count  # the total so far; read by status() without the lock

    def _rotate(self) -> None:
        if self.config.keep is None:
            return
        try:
            answer = self._worker.call({"rotate": True})
        except (_Stopped, ObjectStoreError):
            return
        if "error" in answer:
            logger.warning(
                "ckptbus: rotation in %s failed (%s); older checkpoints are kept there",
                self.remote.url,
                answer["error"],
            )
            return
        for url in answer["rotated"]:
            logger.info("ckptbus: remote.keep=%s: deleted %s", self.config.keep, url)

    def _summary(self, deadline: float, interrupted: bool) -> str:
        with self._lock:
            missing = [u.info.path.name for u in self._waiting]
            failed = dict(self._failed)
            done = list(self._done)
        if not missing and not failed:
            if not done:
                return ""
            return f"ckptbus: checkpoints safe in {self.remote.url}: the newest is {done[-1][1]}"
        why = "a second interrupt" if interrupted else f"the {deadline:.0f} s deadline (remote.exit_deadline_seconds)"
        parts = []
        if missing:
            parts.append(f"{', '.join(missing)} not uploaded by {why}")
        if failed:
            parts.append("; ".join(f"{Path(p).name} failed: {w}" for p, w in failed.items()))
        newest = f"; the newest complete there is {done[-1][1]}" if done else "; none is complete there"
        return f"ckptbus: NOT in {self.remote.url}: {'; '.join(parts)} (complete on local disk only){newest}"


class _SignalsNoted:
    """While the main process drains its uploads, SIGTERM and SIGHUP are noted in the log instead of ending it
    (the sources that handled them are closed by then): the deadline bounds the wait. Only on the main thread,
    where handlers can be set; elsewhere nothing changes."""

    SIGNALS: Final = (signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self._previous: dict[int, object] = {}
        self.seen: list[str] = []

    def __enter__(self) -> _SignalsNoted:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._noted)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]

    def _noted(self, signum: int, frame: FrameType | None) -> None:
        self.seen.append(signal.Signals(signum).name)  # recorded only (a handler does no I/O): logged after
