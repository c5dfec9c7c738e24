"""``ckptbus status``: where a running job is (step, last checkpoint, pending requests)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .._client import ClientError, TimedOut, call
from .._names import CHECKPOINT_PREFIX
from .._protocol import ProtocolError, StatusRequest
from ._common import (
    EXIT_ERROR,
    EXIT_FOR_ERROR_CODE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CommandError,
    add_json_argument,
    add_target_arguments,
    check_run,
    command_parser,
    emit_json,
    fail,
    in_output_dir,
    target_of,
)
from ._grace_period import save_timings, timing_rows

DESCRIPTION = """\
Ask the running job where it is: the last optimizer step it finished, the
newest checkpoint it completed since it started (or resumed), pending requests
(socket requests with how many clients wait for each), the number of processes,
whether it is stopping, and the main process's pid and socket. From the run's
event log: how long its saves took, and the grace period to ask a scheduler
for. With remote_dir: the upload backlog (in flight, queued, failed, retried
after an error) and the last upload's throughput."""

EPILOG = """\
--json: the run's reply, {"ok": true, "status": {"step", "last_checkpoint",
"last_checkpoint_step", "pending_requests", "world_size", "stopping",
"output_dir", "pid", "socket", "socket_requests", "saves": {"full",
"weights", "grace_period_seconds", ...}, "uploads": null or {"remote_dir",
"in_flight", "in_flight_bytes_sent", "queued", "failed", "retrying",
"last_uploaded", "last_upload_seconds", "last_upload_bytes_per_second"},
...}}; paths are absolute

exit codes: 0 ok, 1 error, 2 usage, 3 run not reachable (or, with --config
naming a socket.path, another run answers there), 5 timed out, 130
interrupted"""


def status_command_parser(subparsers: Any = None) -> argparse.ArgumentParser:
    summary = "ask the run where it is: step, last checkpoint, pending requests"
    parser = command_parser(subparsers, "status", summary, DESCRIPTION, EPILOG)
    add_target_arguments(parser)
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="give up when the run has not answered within this long (exit 5; default 10)",
    )
    add_json_argument(parser)
    if subparsers is not None:
        parser.set_defaults(func=status_command)
    return parser


def status_command(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        return fail(args, CommandError(EXIT_USAGE, "usage", f"--timeout must be above 0, got {args.timeout}"))
    try:
        target = target_of(args)
        replies = list(call(target.socket, StatusRequest(), timeout=args.timeout))
        if replies and replies[0]["ok"]:
            check_run(target, replies[0].get("status"))
    except CommandError as exc:
        return fail(args, exc)
    except TimedOut as exc:
        return fail(args, CommandError(EXIT_TIMEOUT, "timeout", str(exc)))
    except ClientError as exc:
        return fail(args, CommandError(EXIT_UNREACHABLE, "unreachable", str(exc)))
    except ProtocolError as exc:
        return fail(args, CommandError(EXIT_ERROR, exc.code, f"the run sent a reply that breaks the protocol: {exc}"))
    except KeyboardInterrupt:
        return fail(args, CommandError(EXIT_INTERRUPTED, "interrupted", "stopped waiting for the run's status"))
    if not replies:
        return fail(
            args, CommandError(EXIT_UNREACHABLE, "unreachable", "the run closed the connection without a reply")
        )
    reply = replies[0]
    if not reply["ok"]:
        code = str(reply["error"]["code"])
        return fail(args, CommandError(EXIT_FOR_ERROR_CODE.get(code, EXIT_ERROR), code, str(reply["error"]["message"])))
    status = reply.get("status")
    if not isinstance(status, dict):
        return fail(args, CommandError(EXIT_ERROR, "bad_json", "status reply without a status object"))
    status = _absolute_paths(status)
    # Read here, beside the run (the socket is local): the event log of the run's own output_dir.
    status["saves"] = save_timings(status.get("output_dir") or args.output_dir)
    if args.json:
        emit_json({**reply, "status": status})
    else:
        print(format_status(status))
    return EXIT_OK


def format_status(status: dict[str, Any]) -> str:
    last = status.get("last_checkpoint")
    last_text = f"{last} (step {status.get('last_checkpoint_step')})" if last else "none yet in this run"
    requests = status.get("socket_requests") or []
    pending = f"{status.get('pending_requests', '?')}"
    if requests:
        pending += " (" + ", ".join(_describe(r) for r in requests) + ")"
    rows = [
        ("output_dir", status.get("output_dir")),
        ("step", status.get("step")),
        ("last checkpoint", last_text),
        ("pending requests", pending),
        ("processes", status.get("world_size")),
        ("stopping", "yes" if status.get("stopping") else "no"),
        ("main process", f"pid {status.get('pid')}, socket {status.get('socket')}"),
    ]
    rows.extend(upload_rows(status.get("uploads")))
    rows.extend(timing_rows(status.get("saves")))
    if "error" in status:
        rows.append(("status error", status["error"]))
    return "\n".join(f"{name + ':':<18}{value}" for name, value in rows)


def upload_rows(uploads: Any) -> list[tuple[str, Any]]:
    """The upload backlog to remote_dir and the last upload's throughput, for people; nothing without remote_dir."""
    if not isinstance(uploads, dict):
        return []
    flight = uploads.get("in_flight")
    parts = []
    if flight is not None:
        sent = uploads.get("in_flight_bytes_sent") or 0
        parts.append(f"in flight {CHECKPOINT_PREFIX}{flight} ({sent / 1e6:.1f} MB sent)")
    queued = uploads.get("queued") or []
    names = ", ".join(f"{CHECKPOINT_PREFIX}{q}" for q in queued)
    parts.append(f"{len(queued)} queued" + (f" ({names})" if queued else ""))
    failed = uploads.get("failed") or {}
    parts.append(
        f"{len(failed)} failed" + (f" ({'; '.join(f'{k}: {v}' for k, v in failed.items())})" if failed else "")
    )
    rows: list[tuple[str, Any]] = [("uploads", f"to {uploads.get('remote_dir')}: " + ", ".join(parts))]
    if uploads.get("retrying"):
        rows.append(("upload retried", uploads["retrying"]))
    last = uploads.get("last_uploaded")
    speed = uploads.get("last_upload_bytes_per_second")
    if last:
        rows.append(("last upload", f"{last}" + (f" ({speed / 1e6:.1f} MB/s)" if speed else " (already there)")))
    return rows


def _absolute_paths(status: dict[str, Any]) -> dict[str, Any]:
    """``status`` with ``last_checkpoint`` absolute: the run names it relative to its own folder when its
    output_dir is relative, and ``output_dir`` in the status is absolute."""
    last, output_dir = status.get("last_checkpoint"), status.get("output_dir")
    if isinstance(last, str) and isinstance(output_dir, str) and os.path.isabs(output_dir):
        return {**status, "last_checkpoint": in_output_dir(last, output_dir)}
    return status


def _describe(request: Any) -> str:
    if not isinstance(request, dict):
        return str(request)
    label = f" {request.get('label')!r}" if request.get("label") else ""
    return f"{request.get('kind')}{label}, {request.get('waiting', 0)} waiting"
