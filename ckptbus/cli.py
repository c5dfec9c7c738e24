"""The ``ckptbus`` command: ``request``, ``status``, ``list`` and ``verify``. Imports no torch (it starts fast).

Exit codes (``ckptbus --help``): 0 success, 1 error reply or unexpected
problem, 2 usage, 3 run not reachable, 4 save failed, 5 timed out, 130
interrupted, 141 stdout closed by its reader (nothing printed).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import sys
import traceback
from typing import Any

from .commands._common import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_STDOUT_CLOSED,
    EXIT_USAGE,
    Parser,
    UsageError,
    emit_json,
    json_emitted,
)
from .commands.list import list_command_parser
from .commands.request import request_command_parser
from .commands.status import status_command_parser
from .commands.verify import verify_command_parser

EPILOG = """\
Run 'ckptbus COMMAND --help' for a command's options, its output and its
--json form.

exit codes: 0 ok, 1 error, 2 usage (bad arguments, a config file that cannot
be read, a missing output directory), 3 run not reachable, 4 save failed,
5 timed out, 130 interrupted, 141 stdout closed by its reader (| head)"""


def get_parser() -> argparse.ArgumentParser:
    parser = Parser(
        "ckptbus",
        description="On-demand checkpoints for a running accelerate job: ask it for a checkpoint\n"
        "(request), see where it is (status), list the checkpoints on disk (list), check them\n"
        "against their manifests (verify).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction, help="print the version of ckptbus and exit")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    request_command_parser(subparsers)
    status_command_parser(subparsers)
    list_command_parser(subparsers)
    verify_command_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit code. Whatever happens, ``--json`` prints exactly one JSON object, and a
    stdout closed by its reader (``ckptbus status | head -2``) ends quietly with :data:`EXIT_STDOUT_CLOSED`."""
    argv = sys.argv[1:] if argv is None else argv
    as_json = "--json" in argv
    json_emitted(reset=True)
    try:
        try:
            code = _main(argv, as_json=as_json)
        except SystemExit as exc:  # --help and --version print, then argparse exits
            if exc.code is not None and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
            code = 1 if exc.code is not None and not isinstance(exc.code, int) else int(exc.code or 0)
        if sys.stdout is not None:
            sys.stdout.flush()  # here, where a closed pipe can still be answered, not at interpreter exit
    except BrokenPipeError:
        return _stdout_closed()
    except KeyboardInterrupt:
        return _unexpected(as_json, EXIT_INTERRUPTED, "interrupted", "interrupted")
    except Exception as exc:
        # A bug, or something no command foresaw: still one JSON object with --json, and the traceback on stderr.
        traceback.print_exc(file=sys.stderr)
        return _unexpected(as_json, EXIT_ERROR, "internal", f"unexpected error: {type(exc).__name__}: {exc}")
    return code


def _main(argv: list[str], *, as_json: bool) -> int:
    parser = get_parser()
    try:
        _check_command(parser, argv)
        args = parser.parse_args(argv)
    except UsageError as exc:
        return _usage_error(exc, as_json=as_json)
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    code: int = args.func(args)
    return code


def _unexpected(as_json: bool, exit_code: int, code: str, message: str) -> int:
    try:
        if as_json and not json_emitted():
            emit_json({"ok": False, "exit_code": exit_code, "error": {"code": code, "message": message}})
            if sys.stdout is not None:
                sys.stdout.flush()
        elif not as_json:
            print(f"ckptbus: {message}", file=sys.stderr)
    except BrokenPipeError:
        return _stdout_closed()
    return exit_code


def _stdout_closed() -> int:
    """The reader of stdout went away. What is still buffered can never be written: point stdout at /dev/null so
    that the interpreter's last flush does not print a BrokenPipeError of its own (Python's documented recipe)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_STDOUT_CLOSED


def _check_command(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Name the closest command for a mistyped one (argparse only lists them all)."""
    word = next((arg for arg in argv if not arg.startswith("-")), None)
    commands = _commands(parser)
    if word is None or word in commands:
        return
    close = difflib.get_close_matches(word, commands, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}?" if close else f"the commands are {', '.join(commands)}"
    raise UsageError(parser, f"unknown command {word!r}; {hint}")


def _commands(parser: argparse.ArgumentParser) -> list[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices)
    return []


def _usage_error(error: UsageError, *, as_json: bool) -> int:
    if as_json:
        emit_json({"ok": False, "exit_code": error.exit_code, "error": {"code": error.code, "message": error.message}})
    else:
        error.parser.print_usage(sys.stderr)
        print(f"{error.parser.prog}: error: {error.message}", file=sys.stderr)
    return error.exit_code


class _VersionAction(argparse.Action):
    """``--version``: the installed distribution's version, looked up only when asked (it reads metadata)."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            text = version("ckptbus")
        except PackageNotFoundError:
            text = "unknown (not installed)"
        print(f"ckptbus {text}")
        parser.exit()


if __name__ == "__main__":
    raise SystemExit(main())
