"""``ckptbus request``: ask a running job for a checkpoint; by default wait and print its path."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .._client import ClientError, ConnectionLost, NotReachable, TimedOut, call
from .._protocol import MAX_LABEL_CHARS, ProtocolError, SaveRequest, encode, parse_request, request_message
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
    command_parser,
    emit_json,
    fail,
    socket_of,
)

DESCRIPTION = """\
Ask the training run for a checkpoint. Every rank saves the same step (the next
step where the ranks vote). By default the command waits and prints the path of
the complete checkpoint; with --no-wait it prints the request id and returns.
Requests that arrive while one is pending share its save."""


def request_command_parser(subparsers: Any = None) -> argparse.ArgumentParser:
    parser = command_parser(subparsers, "request", "ask the run for a checkpoint", DESCRIPTION)
    add_target_arguments(parser)
    parser.add_argument(
        "--kind",
        choices=("full", "weights"),
        default="full",
        help="full: resumable (accelerator.save_state); weights: model.safetensors only (default: full)",
    )
    parser.add_argument(
        "--label", help=f"free text recorded in the manifest and the event log (<= {MAX_LABEL_CHARS} chars)"
    )
    parser.add_argument("--no-wait", action="store_true", help="return once the run has queued the request")
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="give up after this long (exit 5; the request stays queued). Default: wait as long as the run "
        "lives; 10 s with --no-wait",
    )
    add_json_argument(parser)
    if subparsers is not None:
        parser.set_defaults(func=request_command)
    return parser


def request_command(args: argparse.Namespace) -> int:
    request = SaveRequest(kind=args.kind, label=args.label, wait=not args.no_wait)
    try:
        parse_request(encode(request_message(request)))  # the server's own checks, before connecting
    except ProtocolError as exc:
        return fail(args, CommandError(EXIT_USAGE, "usage", exc.message))
    timeout = args.timeout if args.timeout is not None else (10.0 if args.no_wait else None)
    if timeout is not None and timeout <= 0:
        return fail(args, CommandError(EXIT_USAGE, "usage", f"--timeout must be above 0, got {timeout}"))
    request_id: str | None = None
    try:
        path = socket_of(args)
        for reply in call(path, request, timeout=timeout):
            if not reply["ok"]:
                return _answer_error(args, reply)
            if reply.get("state") == "queued":
                request_id = str(reply.get("request_id"))
                if not request.wait:
                    return _print(args, reply, request_id)
                if not args.json:
                    shared = " (sharing a pending request)" if reply.get("shared") else ""
                    print(
                        f"ckptbus: {args.kind} checkpoint requested{shared}; waiting for the run to save it...",
                        file=sys.stderr,
                    )
            elif reply.get("state") == "completed":
                return _print(args, reply, str(reply["path"]))
        raise ConnectionLost(f"{path} closed the connection before the save finished (did the run die?)")
    except CommandError as exc:
        return fail(args, exc)
    except TimedOut as exc:
        queued = f"; request {request_id} stays queued in the run" if request_id else ""
        return fail(args, CommandError(EXIT_TIMEOUT, "timeout", f"{exc}{queued}"))
    except (NotReachable, ConnectionLost) as exc:
        return fail(args, CommandError(EXIT_UNREACHABLE, "unreachable", str(exc)))
    except ClientError as exc:
        return fail(args, CommandError(EXIT_UNREACHABLE, "unreachable", str(exc)))
    except ProtocolError as exc:
        return fail(args, CommandError(EXIT_ERROR, exc.code, f"the run sent a reply that breaks the protocol: {exc}"))
    except KeyboardInterrupt:
        queued = f"; request {request_id} stays queued in the run" if request_id else ""
        return fail(args, CommandError(EXIT_INTERRUPTED, "interrupted", f"stopped waiting{queued}"))


def _print(args: argparse.Namespace, reply: dict[str, Any], line: str) -> int:
    if args.json:
        emit_json(reply)
    else:
        print(line)
    return EXIT_OK


def _answer_error(args: argparse.Namespace, reply: dict[str, Any]) -> int:
    code = str(reply["error"]["code"])
    message = str(reply["error"]["message"])
    exit_code = EXIT_FOR_ERROR_CODE.get(code, EXIT_ERROR)
    if args.json:
        emit_json({**reply, "exit_code": exit_code})
        return exit_code
    what = {"save_failed": "the checkpoint was not saved", "shutting_down": "the run ended first"}.get(code, code)
    print(f"ckptbus request: {what}: {message}", file=sys.stderr)
    return exit_code
