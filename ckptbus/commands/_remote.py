"""What ``ckptbus list`` and ``ckptbus verify`` do with an ``s3://`` URL: the checkpoints in a bucket.

boto3 is imported only here, and only when a URL is given: the CLI's start
stays as fast as before (benchmarks/cli_startup.py). Long transfers show a
progress bar on stderr when it is a terminal (tqdm), never with ``--json``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .._errors import ConfigError
from .._object_store import ObjectStore, ObjectStoreError, Progress
from .._remote_checkpoints import (
    RemoteCheckpoint,
    RemoteReport,
    RemoteUnusable,
    remote_victims,
    scan_remote,
    verify_remote,
)
from .._remote_url import RemoteTarget, parse_target
from ._common import EXIT_ERROR, EXIT_UNREACHABLE, EXIT_USAGE, CommandError


def target(url: str) -> RemoteTarget:
    """The bucket (and checkpoint) ``url`` names; a bad URL is a usage error naming it."""
    try:
        return parse_target(url)
    except ConfigError as exc:
        raise CommandError(EXIT_USAGE, "usage", str(exc).replace("config key 'checkpoint': ", "")) from None


@contextmanager
def opened(remote: Any) -> Iterator[ObjectStore]:
    """A store for ``remote``: a missing boto3, a bad endpoint or a failed request are one-line command errors."""
    try:
        store = ObjectStore(remote)
    except ImportError:
        raise CommandError(EXIT_ERROR, "no_boto3", "s3:// URLs need boto3: pip install 'ckptbus[s3]'") from None
    except ObjectStoreError as exc:
        raise CommandError(EXIT_UNREACHABLE, "unreachable", str(exc)) from None
    try:
        yield store
    except ObjectStoreError as exc:
        code = EXIT_UNREACHABLE if exc.transient else EXIT_ERROR
        raise CommandError(code, "unreachable" if exc.transient else "store_error", str(exc)) from None
    finally:
        store.close()


def scan(url: str) -> tuple[list[RemoteCheckpoint], list[RemoteUnusable]]:
    with opened(target(url).remote) as store:
        return scan_remote(store)


def list_rows(url: str, keep: int | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows of ``ckptbus list URL``: complete checkpoints (``keep`` from ``remote.keep``), then the others."""
    complete, unusable = scan(url)
    victims = {c.step for c in remote_victims(complete, unusable, keep)[0]}
    rows = [
        {
            "path": c.url,
            "step": c.step,
            "kind": c.manifest.kind,
            "reason": c.manifest.reason,
            "labels": list(c.manifest.labels),
            "bytes": c.manifest.bytes,
            "created": c.manifest.created,
            "world_size": c.manifest.world_size,
            "keep": None if keep is None else c.step not in victims,
        }
        for c in complete
    ]
    others = [{"path": u.url, "step": u.step, "why": u.why, "damaged": u.damaged, "link": False} for u in unusable]
    return rows, others


def verify_rows(url: str, *, show_progress: bool, mode: str = "full") -> list[dict[str, Any]]:
    """``ckptbus verify URL``: every checkpoint under a remote_dir (newest first), or the one a checkpoint URL
    names; every object read and compared with its size and digest (``mode`` ``sizes``: the listing's sizes)."""
    wanted = target(url)
    with opened(wanted.remote) as store:
        complete, unusable = scan_remote(store)
        if wanted.step is not None:
            complete = [c for c in complete if c.step == wanted.step]
            unusable = [u for u in unusable if u.step == wanted.step]
            if not complete and not unusable:
                raise CommandError(EXIT_USAGE, "usage", f"{url} does not exist (`ckptbus list {wanted.remote.url}`)")
        if not complete and not unusable:
            raise CommandError(EXIT_USAGE, "usage", f"no checkpoint-<step> folder in {url}")
        rows: list[tuple[int, dict[str, Any]]] = [
            (u.step, _row(u.url, u.step, "failed" if u.damaged else "incomplete", problem=u.why)) for u in unusable
        ]
        if mode == "sizes":  # the listing checked every object's size already (scan_remote)
            rows += [(c.step, _row(c.url, c.step, "ok", mode="sizes", files=len(c.manifest.files))) for c in complete]
            complete = []
        total = sum(c.manifest.bytes for c in complete)
        with _bar(total, show_progress) as progress:
            for checkpoint in sorted(complete, key=lambda c: c.step, reverse=True):
                report = verify_remote(store, checkpoint, progress)
                rows.append((checkpoint.step, _report_row(report)))
    return [row for _, row in sorted(rows, key=lambda pair: pair[0], reverse=True)]


@contextmanager
def _bar(total: int, show: bool) -> Iterator[Progress | None]:
    if not show or total == 0:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, desc="verify", file=sys.stderr, disable=None, leave=False) as bar:
        yield bar.update


def _report_row(report: RemoteReport) -> dict[str, Any]:
    note = None
    if report.undigested:
        note = f"{len(report.undigested)} file(s) without a digest, checked by size: {', '.join(report.undigested)}"
    return _row(
        report.url,
        report.step,
        "ok" if report.ok else "failed",
        files=report.files,
        bytes_read=report.bytes_read,
        seconds=report.seconds,
        file=report.bad_file,
        problem=report.problem,
        note=note,
    )


def _row(url: str, step: int, status: str, **fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "path": url,
        "step": step,
        "status": status,
        "mode": "full",
        "files": 0,
        "bytes_read": 0,
        "seconds": 0.0,
        "file": None,
        "expected": None,
        "found": None,
        "problem": None,
        "note": None,
    }
    row.update(fields)
    row["seconds"] = round(row["seconds"], 3)
    return row
