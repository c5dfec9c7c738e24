"""What the subcommands share: exit codes, finding the run, printing results and errors."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Final, NoReturn

from .._config import CheckpointConfig, build, read_yaml
from .._errors import ConfigError
from .._layout import list_checkpoints
from .._names import CHECKPOINT_PREFIX, MANIFEST_NAME
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
EXIT_STDOUT_CLOSED: Final = 141
"""stdout was closed by its reader (``ckptbus status | head -2``): 128 + SIGPIPE, what a shell reports for a
command that SIGPIPE ended, as ``git log | head`` or ``yes | head``. Nothing is printed."""

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


class UsageError(CommandError):
    """Bad arguments, as argparse found them; ``parser`` prints the usage line of the command concerned."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(EXIT_USAGE, "usage", message)
        self.parser = parser


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that raises :class:`UsageError` instead of exiting.

    So that ``--json`` gets its JSON error for bad arguments too (argparse
    itself prints text and exits). Subparsers are made of this class as well.
    """

    def error(self, message: str) -> NoReturn:
        raise UsageError(self, message)


def command_parser(
    subparsers: Any, name: str, summary: str, description: str, epilog: str | None = None
) -> argparse.ArgumentParser:
    """The parser of ``ckptbus <name>``: a subcommand of ``subparsers``, or on its own when that is None.

    ``description`` and ``epilog`` are printed as written (line breaks kept).
    """
    kwargs: dict[str, Any] = {
        "description": description,
        "epilog": epilog,
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }
    if subparsers is None:
        return Parser(f"ckptbus {name}", **kwargs)
    parser: argparse.ArgumentParser = subparsers.add_parser(name, help=summary, **kwargs)
    return parser


def add_target_arguments(parser: argparse.ArgumentParser, *, socket: bool = True) -> None:
    """``--output-dir`` / ``--config`` (and ``--socket``): which run a command talks to."""
    group = parser.add_argument_group("which run (give one)")
    group.add_argument(
        "--output-dir",
        metavar="DIR",
        help="the run's output_dir, the folder that holds its checkpoint-<step> folders (not one of them). "
        "A relative output_dir in the run's config is relative to the folder the run was started in: run ckptbus "
        "from there, or give the absolute path."
        + (
            " The run's socket is DIR/ckptbus.sock, or where DIR/ckptbus.sock.path points (long paths)."
            if socket
            else ""
        ),
    )
    group.add_argument(
        "--config",
        metavar="FILE",
        help="the run's YAML config: its output_dir"
        + (" and dynamic_checkpoint.socket.path are" if socket else ", save_total_limit and rotate_on_demand are")
        + " read from it; the training script's own keys are ignored. --output-dir given as well wins over the "
        "file's output_dir.",
    )
    if socket:
        group.add_argument(
            "--socket",
            metavar="PATH",
            help="the run's UNIX socket itself, instead of --output-dir/--config (for a socket.path set in the config)",
        )


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        help='print one JSON object on stdout instead of text, errors included: {"ok": true, ...} or '
        '{"ok": false, "exit_code": N, "error": {"code": ..., "message": ...}}',
    )


def read_config(path: str) -> CheckpointConfig:
    """The ckptbus keys of a training config; keys of the training script itself are ignored."""
    try:
        data = read_yaml(path)  # its errors name the file
    except ConfigError as exc:
        raise CommandError(EXIT_USAGE, "usage", str(exc)) from None
    try:
        names = {f.name for f in dataclasses.fields(CheckpointConfig)}
        return build(CheckpointConfig, {k: v for k, v in data.items() if k in names})
    except ConfigError as exc:
        raise CommandError(EXIT_USAGE, "usage", f"{path}: {exc}") from None


def output_dir_of(args: argparse.Namespace, config: CheckpointConfig | None) -> str | None:
    if args.output_dir is not None:
        return str(args.output_dir)
    return config.output_dir if config is not None else None


_CHECKPOINT_NAME = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}\d+$")


def check_output_dir(output_dir: str, *, must_exist: bool = True) -> None:
    """Refuse, with a message that says what to give instead, a missing folder or a checkpoint given as output_dir.

    Raises :class:`CommandError` (exit 2). ``must_exist=False``: only the
    checkpoint check (the run's socket may be elsewhere, from its config).
    """
    path = Path(output_dir)
    if not path.is_dir():
        if not must_exist:
            return
        what = "is not a directory" if path.exists() else "does not exist"
        hint = (
            ""
            if path.is_absolute()
            else f" (from {os.getcwd()}; a relative output_dir is relative to the folder the run was started in)"
        )
        raise CommandError(EXIT_USAGE, "usage", f"output directory {output_dir} {what}{hint}")
    if _is_checkpoint(path):
        parent = Path(os.path.abspath(path)).parent
        raise CommandError(
            EXIT_USAGE,
            "usage",
            f"{output_dir} is a checkpoint, not a run's output directory: use --output-dir {parent}",
        )


def _is_checkpoint(path: Path) -> bool:
    # A complete checkpoint holds its manifest; a checkpoint-<step> folder without one (a Trainer's own, or an
    # incomplete one) counts too unless it holds checkpoints itself (an output_dir that happens to be so named).
    if (path / MANIFEST_NAME).is_file():
        return True
    return bool(_CHECKPOINT_NAME.match(path.name)) and not list_checkpoints(path)


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """The run a command talks to."""

    socket: Path
    output_dir: str | None
    """The run's output_dir as the user named it (``--output-dir`` or the config); None with ``--socket``."""
    socket_configured: bool = False
    """The socket path is the config's ``dynamic_checkpoint.socket.path``, not found from ``output_dir``: another
    run may serve it (two configs with one socket.path), so the run that answers is checked (:func:`check_run`)."""


def target_of(args: argparse.Namespace) -> Target:
    """The run named by ``--socket``, ``--output-dir`` or ``--config``. Raises :class:`CommandError` (exit 2)."""
    given = [name for name in ("socket", "output_dir", "config") if getattr(args, name, None) is not None]
    if not given:
        raise CommandError(EXIT_USAGE, "usage", "say which run: --output-dir DIR (or --socket PATH, or --config FILE)")
    if args.socket is not None:
        if len(given) > 1:
            raise CommandError(EXIT_USAGE, "usage", "--socket names the run by itself; leave out --output-dir/--config")
        return Target(client_socket_path(sock=args.socket), None)
    config = read_config(args.config) if args.config is not None else None
    output_dir = output_dir_of(args, config)
    assert output_dir is not None
    configured = config.dynamic_checkpoint.socket.path if config is not None else None
    # A configured socket path does not depend on output_dir: only then may the folder be missing here.
    check_output_dir(output_dir, must_exist=configured is None)
    socket = client_socket_path(output_dir=output_dir, configured=configured)
    return Target(socket, output_dir, socket_configured=configured is not None)


EXIT_WRONG_RUN: Final = EXIT_UNREACHABLE
"""The run that answers at the socket has another output_dir: the run asked for is not reachable there."""


def check_run(target: Target, status: object) -> None:
    """Refuse (:class:`CommandError`, exit 3, code ``wrong_run``) when the run that answered at a configured socket
    path serves another output_dir than the one named: two runs' configs share ``socket.path``, the first run
    took the socket, and the second trains on without one.

    ``status``: the ``status`` object of the run's status reply (its ``output_dir`` is absolute, symlinks
    resolved). A socket found from output_dir itself (``DIR/ckptbus.sock``, or the pointer file in DIR) is bound
    by the run that holds DIR's lock only, so it is not checked; nor is a run that does not say.
    """
    if not target.socket_configured or target.output_dir is None or not isinstance(status, dict):
        return
    served = status.get("output_dir")
    if not isinstance(served, str) or not served:
        return
    if _same_directory(target.output_dir, served):
        return
    raise CommandError(
        EXIT_WRONG_RUN,
        "wrong_run",
        f"the run at {target.socket} serves output_dir {served} (pid {status.get('pid', '?')}), "
        f"not {target.output_dir}: two runs' configs share dynamic_checkpoint.socket.path, and the run of this "
        "config has no socket (its log says why). Give each run its own socket.path. (If both name one directory "
        "through different mounts, --socket PATH skips this check.)",
    )


def _same_directory(named: str, served: str) -> bool:
    """Whether ``named`` (as the user gave it, relative to here or to where the run started) is ``served`` (the
    run's absolute, resolved output_dir)."""
    with contextlib.suppress(OSError):
        return os.path.samefile(named, served)
    if os.path.isabs(named) or os.path.exists(named):
        return os.path.realpath(named) == os.path.normpath(served)
    # Relative and not found here: relative to the folder the run was started in, which this process does not
    # know. The run's output_dir must end with it.
    parts = Path(os.path.normpath(named)).parts
    return ".." not in parts and Path(served).parts[-len(parts) :] == parts


def socket_of(args: argparse.Namespace) -> Path:
    """The socket a command connects to (see :func:`target_of`)."""
    return target_of(args).socket


def in_output_dir(path: str, output_dir: str | os.PathLike[str]) -> str:
    """``path``, a checkpoint the run named, made absolute against the run's ``output_dir`` (absolute itself).

    A run names its checkpoints ``<output_dir as configured>/checkpoint-<step>``, relative to the folder the
    run was started in when its output_dir is relative; a checkpoint always sits right inside output_dir, so its
    folder name is all that is kept.
    """
    if os.path.isabs(path):
        return path
    return str(Path(output_dir) / Path(path).name)


_emitted = False


def emit_json(data: dict[str, Any]) -> None:
    """Print ``data`` as the command's one JSON object (see :func:`json_emitted`)."""
    global _emitted
    _emitted = True
    text = json.dumps(data, indent=2, default=str) + "\n"
    if sys.stdout is not None:  # None: the process started with stdout closed
        sys.stdout.write(text)


def json_emitted(reset: bool = False) -> bool:
    """Whether :func:`emit_json` printed an object since the last reset (the CLI prints exactly one)."""
    global _emitted
    emitted = _emitted
    if reset:
        _emitted = False
    return emitted


def fail(args: argparse.Namespace, error: CommandError) -> int:
    """Report ``error`` (JSON on stdout with ``--json``, else a line on stderr); return its exit code."""
    if getattr(args, "json", False):
        emit_json({"ok": False, "exit_code": error.exit_code, "error": {"code": error.code, "message": error.message}})
    else:
        command = getattr(args, "command", None)
        print(f"ckptbus {command}: {error.message}" if command else f"ckptbus: {error.message}", file=sys.stderr)
    return error.exit_code
