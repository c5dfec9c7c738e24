"""``ckptbus request``: ask a running job for a checkpoint; by default wait and print its path."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from .._client import ClientError, ConnectionLost, NotReachable, TimedOut, call
from .._protocol import (
    MAX_LABEL_CHARS,
    ProtocolError,
    SaveRequest,
    StatusRequest,
    encode,
    parse_request,
    request_message,
)
from ._common import (
    EXIT_ERROR,
    EXIT_FOR_ERROR_CODE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CommandError,
    Target,
    add_json_argument,
    add_target_arguments,
    check_run,
    command_parser,
    emit_json,
    fail,
    in_output_dir,
    target_of,
)

DESCRIPTION = """\
Ask the training run for a checkpoint. Every rank saves the same step (the next
step where the ranks vote). By default the command waits and prints the path of
the complete checkpoint; with --no-wait it prints the request id and returns.
Requests that arrive while one is pending share its save.

Nothing is printed on stdout but the answer, so path=$(ckptbus request ...)
works; progress goes to stderr. Ctrl+C while waiting stops waiting (exit 130);
the request stays queued in the run."""

EPILOG = """\
output:
  the absolute path of the complete checkpoint (with --no-wait: the request id)
  --json: the run's last reply, {"ok": true, "state": "completed", "path",
  "step", "kind", "labels", "bytes", "seconds", ...} ("state": "queued" with
  --no-wait); "path" is absolute

With --config naming a dynamic_checkpoint.socket.path, the run that answers
there must serve the config's output_dir; another run's answer is refused
(exit 3, wrong_run) before any checkpoint is asked for.

exit codes: 0 ok, 1 error, 2 usage, 3 run not reachable (or another run
answers), 4 save failed (or the run ended first), 5 timed out, 130
interrupted"""


def request_command_parser(subparsers: Any = None) -> argparse.ArgumentParser:
    parser = command_parser(subparsers, "request", "ask the run for a checkpoint", DESCRIPTION, EPILOG)
    add_target_arguments(parser)
    parser.add_argument(
        "--kind",
        choices=("full", "weights"),
        default="full",
        help="full (the default): a resumable checkpoint (accelerator.save_state: model, optimizer, scheduler, "
        "RNG states); weights: the model's weights only (model.safetensors and config.json), for inference or "
        "from_pretrained",
    )
    parser.add_argument(
        "--label",
        metavar="TEXT",
        help=f"free text recorded in the checkpoint's manifest (labels, shown by 'ckptbus list') and in the event "
        f"log; at most {MAX_LABEL_CHARS} characters, no control characters",
    )
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="return as soon as the run has queued the request, printing the request id; the checkpoint is "
        "written at the next step where the ranks vote",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="give up after this long (exit 5); the request stays queued in the run and is still served. "
        "Default: wait as long as the run lives; 10 s with --no-wait",
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
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        target = target_of(args)
        path = target.socket
        if target.socket_configured:
            # Before asking for a save: the run that answers must be the one named (else it would save, for
            # a request meant for another run).
            check_run(target, _status_of(target, _left(deadline, STATUS_TIMEOUT)))
        for reply in call(path, request, timeout=_left(deadline, None)):
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
                reply = {**reply, "path": _absolute(str(reply["path"]), target)}
                return _print(args, reply, reply["path"])
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


def _absolute(path: str, target: Target) -> str:
    """The checkpoint ``path`` the run sent, absolute: usable from any folder, unlike a path relative to the run's.

    The run names a checkpoint the way its output_dir was configured. If that is relative, it is relative to the
    run's working folder, which this process does not know: the output_dir named here is tried first, then the
    absolute output_dir the run gives in its status.
    """
    if os.path.isabs(path):
        return path
    if target.output_dir is not None:
        here = in_output_dir(path, os.path.abspath(target.output_dir))
        if os.path.isdir(here):
            return here
    run_dir = _run_output_dir(target)
    if run_dir is not None:
        return in_output_dir(path, run_dir)
    print(f"ckptbus request: the run gave a path relative to the folder it was started in: {path}", file=sys.stderr)
    return path


STATUS_TIMEOUT = 10.0
"""Seconds the run has to answer the status request that identifies it, when no --timeout bounds it."""


def _left(deadline: float | None, default: float | None) -> float | None:
    if deadline is None:
        return default
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimedOut("the deadline passed")
    return left


def _status_of(target: Target, timeout: float | None) -> object:
    """The run's status object (raises what :func:`call` raises; an error reply is a :class:`CommandError`)."""
    replies = list(call(target.socket, StatusRequest(), timeout=timeout))
    if not replies:
        raise ConnectionLost(f"{target.socket} closed the connection without a reply")
    reply = replies[0]
    if not reply["ok"]:
        code = str(reply["error"]["code"])
        raise CommandError(EXIT_FOR_ERROR_CODE.get(code, EXIT_ERROR), code, str(reply["error"]["message"]))
    return reply.get("status")


def _run_output_dir(target: Target) -> str | None:
    """The run's absolute output_dir, from a status request (None if the run no longer answers)."""
    try:
        replies = list(call(target.socket, StatusRequest(), timeout=5.0))
    except (ClientError, ProtocolError):
        return None
    status = replies[0].get("status") if replies and replies[0]["ok"] else None
    output_dir = status.get("output_dir") if isinstance(status, dict) else None
    return output_dir if isinstance(output_dir, str) and os.path.isabs(output_dir) else None


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
