"""``ckptbus verify``: check checkpoints on disk against their manifests, as resume does (no torch, no run)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .._errors import CheckpointError
from .._layout import Unusable, read_checkpoint, scan_checkpoints, was_complete
from .._remote_url import is_remote
from .._verify import VERIFY_MODES, VerifyMode, VerifyReport, verify_checkpoint
from ._common import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    add_json_argument,
    add_target_arguments,
    check_output_dir,
    command_parser,
    emit_json,
    fail,
    output_dir_of,
    read_config,
)
from .list import human_size

DESCRIPTION = """\
Check checkpoints the way a resume checks them before loading anything: every
file the manifest (ckptbus.json) lists is there, has its recorded size and
(--mode full, the default) its recorded content digest. Give checkpoint
folders, or --output-dir DIR (or --config FILE) for every checkpoint-<step>
folder in a run's output directory, newest first.

Each line says ok, FAILED (the first bad file, what the manifest records and
what is on disk) or INCOMPLETE (no manifest: a save that never completed, or
a folder ckptbus did not write; resume never takes those, and they do not
fail the command). A listed path outside the checkpoint or through a
symbolic link, a listed file that is not a regular file (never opened, so a
FIFO cannot hang it), a file the manifest does not list, and a
checkpoint-<step> folder that is a symbolic link are FAILED, named
(pass a link's real path instead). Checkpoints written before digests existed are checked
by size, and say so. Reads every byte with --mode full: about one read of
the checkpoints from disk.

An s3:// URL checks checkpoints in object storage the same way (every
object read and compared with its size and digest, nothing kept on disk,
a progress bar on a terminal): s3://BUCKET/PREFIX for every checkpoint of
a remote_dir, s3://BUCKET/PREFIX/checkpoint-<step> for one."""

EPILOG = """\
--json: {"ok": true|false, "checkpoints": [{"path", "step", "status" (ok,
failed, incomplete), "mode", "files", "bytes_read", "seconds", "file",
"expected", "found", "problem", "note"}]}, with "exit_code" and "error" when
a checkpoint failed

exit codes: 0 every checkpoint passes, 1 at least one failed, 2 usage (a
missing folder, no checkpoint given)"""


def verify_command_parser(subparsers: Any = None) -> argparse.ArgumentParser:
    parser = command_parser(
        subparsers, "verify", "check checkpoints against their manifests (sizes, digests)", DESCRIPTION, EPILOG
    )
    parser.add_argument(
        "paths",
        nargs="*",
        metavar="CHECKPOINT",
        help="checkpoint folders to check, or s3:// URLs (a remote_dir, or one checkpoint-<step> in it)",
    )
    add_target_arguments(parser, socket=False)
    parser.add_argument(
        "--mode",
        choices=[m for m in VERIFY_MODES if m != "off"],
        default="full",
        help="full (default): sizes and content digests, reading every byte; sizes: sizes only (a few stat calls)",
    )
    add_json_argument(parser)
    if subparsers is not None:
        parser.set_defaults(func=verify_command)
    return parser


def verify_command(args: argparse.Namespace) -> int:
    try:
        remote = [p for p in args.paths if is_remote(p)]
        args.paths = [p for p in args.paths if not is_remote(p)]
        targets = _targets(args) if args.paths or not remote else []
        rows = [_check(target, args.mode) for target in targets]
        if remote:
            from ._remote import verify_rows  # boto3 only now

            for url in remote:
                rows += verify_rows(url, show_progress=not args.json, mode=args.mode)
    except CommandError as exc:
        return fail(args, exc)
    failed = [r for r in rows if r["status"] == "failed"]
    if args.json:
        envelope: dict[str, Any] = {"ok": not failed, "checkpoints": rows}
        if failed:
            envelope["exit_code"] = EXIT_ERROR
            envelope["error"] = {"code": "verification_failed", "message": _failure_summary(failed, len(rows))}
        emit_json(envelope)
    else:
        for row in rows:
            print(_line(row))
        if failed:
            print(f"ckptbus verify: {_failure_summary(failed, len(rows))}", file=sys.stderr)
    return EXIT_ERROR if failed else EXIT_OK


def _targets(args: argparse.Namespace) -> list[Path | Unusable]:
    """The checkpoints to check: the paths given, or every checkpoint-<step> folder of the output_dir, newest first."""
    if args.paths and (args.output_dir is not None or args.config is not None):
        raise CommandError(EXIT_USAGE, "usage", "give checkpoint folders or --output-dir/--config, not both")
    if args.paths:
        return [Path(p) for p in args.paths]
    config = read_config(args.config) if args.config is not None else None
    output_dir = output_dir_of(args, config)
    if output_dir is None:
        raise CommandError(EXIT_USAGE, "usage", "say what: checkpoint folders, or --output-dir DIR (or --config FILE)")
    check_output_dir(output_dir)
    complete, unusable = scan_checkpoints(output_dir)
    found: list[tuple[int, Path | Unusable]] = [(c.step, c.path) for c in complete]
    found += [(u.step, u) for u in unusable]
    if not found:
        raise CommandError(EXIT_USAGE, "usage", f"no checkpoint-<step> folder in {output_dir}")
    return [target for _, target in sorted(found, key=lambda pair: pair[0], reverse=True)]


def _check(target: Path | Unusable, mode: VerifyMode) -> dict[str, Any]:
    if isinstance(target, Unusable):
        return _row(target.path, "failed" if target.damaged else "incomplete", mode, problem=target.why)
    try:
        info = read_checkpoint(target)
    except CheckpointError as exc:
        # The same verdict as --output-dir gives the same folder (scan_checkpoints): a manifest, or a link, is
        # a checkpoint that was complete once and changed since.
        return _row(target, "failed" if was_complete(target) else "incomplete", mode, problem=str(exc))
    report = verify_checkpoint(info, mode)
    return _row(info.path, "ok" if report.ok else "failed", mode, report=report, step=info.step)


def _row(
    path: Path,
    status: str,
    mode: VerifyMode,
    *,
    report: VerifyReport | None = None,
    step: int | None = None,
    problem: str | None = None,
) -> dict[str, Any]:
    return {
        "path": os.path.abspath(path),
        "step": step,
        "status": status,
        "mode": mode,
        "files": report.files if report else 0,
        "bytes_read": report.bytes_read if report else 0,
        "seconds": round(report.seconds, 3) if report else 0.0,
        "file": report.bad_file if report else None,
        "expected": report.expected if report else None,
        "found": report.found if report else None,
        "problem": report.problem if report else problem,
        "note": report.note if report else None,
    }


def _line(row: dict[str, Any]) -> str:
    name = row["path"].rsplit("/", 1)[-1]
    if row["status"] != "ok":
        return f"{name}  {row['status'].upper()}  {row['problem']}  ({row['path']})"
    read = f", {human_size(row['bytes_read'])} read" if row["bytes_read"] else ""
    note = f"; {row['note']}" if row["note"] else ""
    return f"{name}  ok  {row['files']} files{read} in {row['seconds']:.2f} s (--mode {row['mode']}){note}"


def _failure_summary(failed: list[dict[str, Any]], total: int) -> str:
    names = ", ".join(r["path"].rsplit("/", 1)[-1] for r in failed)
    return f"{len(failed)} of {total} checkpoint(s) failed verification: {names}"
