"""What the subcommands share: exit codes, finding the run, printing results and errors."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Final

from .._config import CheckpointConfig, build, read_yaml
from .._errors import ConfigError
from .._socket_path import client_socket_path

EXIT_OK: Final = 0
"""Success."""
EXIT_ERROR: Final = 1
"""The run answered with a protocol error, or something unexpected happened."""
EXIT_USAGE: Final = 2
"""Bad arguments (argparse's own code), a config file that cannot be read, an output_dir that does not exist."""
EXIT_UNREACHABLE: Final = 3
"""No run serves the socket, the connection broke, or the run refused this client (another user, busy)."""
EXIT_SAVE_FAILED: Final = 4
"""The run did not write the checkpoint: the save failed, or the run ended before serving the request."""
EXIT_TIMEOUT: Final = 5
"""``--timeout`` passed before the answer came (the request stays queued in the run)."""
EXIT_INTERRUPTED: Final = 130
"""Ctrl+C while waiting (the request stays queued in the run)."""

# Error codes of the protocol, as exit codes of the CLI.
EXIT_FOR_ERROR_CODE: Final = {
    "forbidden": EXIT_UNREACHABLE,
    "busy": EXIT_UNREACHABLE,
    "save_failed": EXIT_SAVE_FAILED,
    "shutting_down": EXIT_SAVE_FAILED,
    "timeout": EXIT_TIMEOUT,
}


class CommandError(Exception):
    """Ends a command with ``exit_code``; ``code`` names the problem for ``--json`` output."""

    def __init__(self, exit_code: int, code: str, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.code = code
        self.message = message


def command_parser(subparsers: Any, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    """The parser of ``ckptbus <name>``: a subcommand of ``subparsers``, or on its own when that is None."""
    kwargs: dict[str, Any] = {"description": description, "formatter_class": argparse.RawDescriptionHelpFormatter}
    if subparsers is None:
        return argparse.ArgumentParser(f"ckptbus {name}", **kwargs)
    parser: argparse.ArgumentParser = subparsers.add_parser(name, help=summary, **kwargs)
    return parser


def add_target_arguments(parser: argparse.ArgumentParser, *, socket: bool = True) -> None:
    """``--output-dir`` / ``--config`` (and ``--socket``): which run a command talks to."""
    group = parser.add_argument_group("which run")
    group.add_argument("--output-dir", metavar="DIR", help="the run's output_dir (finds its socket, even a moved one)")
    group.add_argument(
        "--config",
        metavar="FILE",
        help="the run's YAML config: output_dir, save_total_limit and dynamic_checkpoint.socket.path are read from it",
    )
    if socket:
        group.add_argument("--socket", metavar="PATH", help="the socket path itself (instead of --output-dir)")


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (for programs)")


def read_config(path: str) -> CheckpointConfig:
    """The ckptbus keys of a training config; keys of the training script itself are ignored."""
    try:
        data = read_yaml(path)
        names = {f.name for f in dataclasses.fields(CheckpointConfig)}
        return build(CheckpointConfig, {k: v for k, v in data.items() if k in names})
    except ConfigError as exc:
        raise CommandError(EXIT_USAGE, "usage", f"{path}: {exc}") from None


def output_dir_of(args: argparse.Namespace, config: CheckpointConfig | None) -> str | None:
    if args.output_dir is not None:
        return str(args.output_dir)
    return config.output_dir if config is not None else None


def socket_of(args: argparse.Namespace) -> Path:
    """The socket a command connects to, from ``--socket``, ``--output-dir`` or ``--config``."""
    given = [name for name in ("socket", "output_dir", "config") if getattr(args, name, None) is not None]
    if not given:
        raise CommandError(EXIT_USAGE, "usage", "say which run: --output-dir DIR (or --socket PATH, or --config FILE)")
    if args.socket is not None:
        if len(given) > 1:
            raise CommandError(EXIT_USAGE, "usage", "--socket names the run by itself; leave out --output-dir/--config")
        return client_socket_path(sock=args.socket)
    config = read_config(args.config) if args.config is not None else None
    output_dir = output_dir_of(args, config)
    assert output_dir is not None
    configured = config.dynamic_checkpoint.socket.path if config is not None else None
    return client_socket_path(output_dir=output_dir, configured=configured)


def emit_json(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def fail(args: argparse.Namespace, error: CommandError) -> int:
    """Report ``error`` (JSON on stdout with ``--json``, else a line on stderr); return its exit code."""
    if getattr(args, "json", False):
        emit_json({"ok": False, "exit_code": error.exit_code, "error": {"code": error.code, "message": error.message}})
    else:
        print(f"ckptbus {args.command}: {error.message}", file=sys.stderr)
    return error.exit_code
