"""``ckptbus status``: where a running job is (step, last checkpoint, pending requests)."""

from __future__ import annotations

import argparse
from typing import Any

from .._client import ClientError, TimedOut, call
from .._protocol import ProtocolError, StatusRequest
from ._common import (
    EXIT_ERROR,
    EXIT_FOR_ERROR_CODE,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CommandError,
    add_json_argument,
    add_target_arguments,
    command_parser,
    emit_json,
    fail,
    socket_of,
)


def status_command_parser(subparsers: Any = None) -> argparse.ArgumentParser:
    description = "Ask the running job where it is: step, last checkpoint, pending requests."
    parser = command_parser(subparsers, "status", description, description)
    add_target_arguments(parser)
    parser.add_argument(
        "--timeout", type=float, default=10.0, metavar="SECONDS", help="give up after this long (default 10)"
    )
    add_json_argument(parser)
    if subparsers is not None:
        parser.set_defaults(func=status_command)
    return parser


def status_command(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        return fail(args, CommandError(EXIT_USAGE, "usage", f"--timeout must be above 0, got {args.timeout}"))
    try:
        replies = list(call(socket_of(args), StatusRequest(), timeout=args.timeout))
    except CommandError as exc:
        return fail(args, exc)
    except TimedOut as exc:
        return fail(args, CommandError(EXIT_TIMEOUT, "timeout", str(exc)))
    except ClientError as exc:
        return fail(args, CommandError(EXIT_UNREACHABLE, "unreachable", str(exc)))
    except ProtocolError as exc:
        return fail(args, CommandError(EXIT_ERROR, exc.code, f"the run sent a reply that breaks the protocol: {exc}"))
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
    if args.json:
        emit_json(status)
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
    if "error" in status:
        rows.append(("status error", status["error"]))
    return "\n".join(f"{name + ':':<18}{value}" for name, value in rows)


def _describe(request: Any) -> str:
    if not isinstance(request, dict):
        return str(request)
    label = f" {request.get('label')!r}" if request.get("label") else ""
    return f"{request.get('kind')}{label}, {request.get('waiting', 0)} waiting"
