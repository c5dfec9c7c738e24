"""The ``ckptbus`` command: ``request``, ``status`` and ``list``. Imports no torch (it starts fast).

Exit codes (``docs/cli.md``): 0 success, 1 error reply or unexpected
problem, 2 usage, 3 run not reachable, 4 save failed, 5 timed out, 130
interrupted.
"""

from __future__ import annotations

import argparse
import sys

from .commands.list import list_command_parser
from .commands.request import request_command_parser
from .commands.status import status_command_parser


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "ckptbus",
        description="On-demand checkpoints for a running accelerate job (docs/cli.md).",
        epilog="exit codes: 0 ok, 1 error, 2 usage, 3 run not reachable, 4 save failed, 5 timed out",
    )
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    request_command_parser(subparsers)
    status_command_parser(subparsers)
    list_command_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
