"""The process that uploads for the tier: ``python -m ckptbus.plugins.tiers.upload_worker URL PARALLELISM KEEP``.

Uploading in the training process itself slows training far more than its
CPU time says: boto3's part threads and the HTTP layer take and give back
the GIL thousands of times a second, and the training thread waits for it
between two operators (benchmarks/remote_training.py measured it). So the
tier's thread (plugins/tiers/uploader.py) hands each checkpoint to this
process, which shares no GIL with training and imports no torch.

Protocol, one JSON object a line: the tier writes ``{"upload": PATH}`` or
``{"rotate": true}`` to stdin; this process answers on stdout with
``{"sent": BYTES}`` (progress, at most a few a second), then one of
``{"done": URL, "bytes": N, "seconds": S, "already": BOOL}``,
``{"error": WHY, "transient": BOOL}``, ``{"rotated": [URL, ...]}``. It ends
at the end of stdin.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from ckptbus._errors import CheckpointError
from ckptbus._layout import read_checkpoint
from ckptbus._object_store import ObjectStore, ObjectStoreError
from ckptbus._remote_checkpoints import rotate_remote, upload_checkpoint
from ckptbus._remote_url import parse_remote

PROGRESS_EVERY: float = 0.25
"""Seconds between two progress lines."""


class _Reply:
    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._lock = threading.Lock()  # progress comes from boto3's part threads

    def __call__(self, **fields: Any) -> None:
        with self._lock:
            self._out.write(json.dumps(fields) + "\n")
            self._out.flush()


def serve(url: str, parallelism: int, keep: int | None, stdin: TextIO, stdout: TextIO) -> None:
    reply = _Reply(stdout)
    store = ObjectStore(parse_remote(url), parallelism=parallelism)
    try:
        for line in stdin:
            request = json.loads(line)
            if "upload" in request:
                _upload(store, Path(request["upload"]), reply)
            elif "rotate" in request:
                try:
                    reply(rotated=rotate_remote(store, keep))
                except ObjectStoreError as exc:
                    reply(error=str(exc), transient=exc.transient)
    finally:
        store.close()


def _upload(store: ObjectStore, path: Path, reply: _Reply) -> None:
    sent = 0
    last = time.monotonic()
    lock = threading.Lock()

    def progress(count: int) -> None:
        nonlocal sent, last
        with lock:
            sent += count
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY:
                last = now
                reply(sent=sent)

    try:
        done = upload_checkpoint(store, read_checkpoint(path), progress=progress)
    except ObjectStoreError as exc:
        reply(error=str(exc), transient=exc.transient)
    except (CheckpointError, OSError) as exc:  # the local checkpoint changed or went away
        reply(error=str(exc), transient=False)
    else:
        reply(done=done.url, bytes=done.bytes, seconds=done.seconds, already=done.already)


def main() -> int:
    # Its life is the tier's: killed at the deadline, or ended by the end of stdin when the training process is
    # gone. A Ctrl+C or SIGTERM sent to the whole job must not cut an upload the tier still waits for.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    url, parallelism, keep = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    serve(url, parallelism, None if keep == "none" else int(keep), sys.stdin, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
