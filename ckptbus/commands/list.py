"""``ckptbus list``: the complete checkpoints on disk (no running job needed)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .._layout import CheckpointInfo, Unusable, rotation_victims, scan_checkpoints
from .._names import EVENT_LOG_NAME
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
from ._save_history import MatplotlibMissing, history_title, plot_save_history, read_save_history

DESCRIPTION = """\
List the complete checkpoints in an output directory, oldest first: step, kind,
what asked for it (reason and labels), size, creation time (UTC), and whether
save_total_limit rotation keeps it. The limit is not stored on disk: give it
with --save-total-limit N (and --rotate-on-demand), or --config FILE to read
save_total_limit and rotate_on_demand from the run's config; without either,
the ROTATION column shows '-'. A checkpoint-<step> entry that is not a
complete checkpoint is not in the table: it is named on stderr with why
("not usable (damaged)" or "(incomplete)"), a symbolic link among them:
ckptbus never follows a checkpoint-<step> that is a link.

`ckptbus list s3://BUCKET/PREFIX` lists the checkpoints in a run's
remote_dir the same way (complete there: the manifest object exists and
every object it lists has its size); --config then reads
remote.keep for the ROTATION column.

--plot FILE draws the run's save history from its event log
(DIR/ckptbus-events.jsonl): when each save finished, how long it took and how
long it held training, failed saves included. It needs matplotlib."""

EPILOG = """\
--json: {"ok": true, "output_dir", "save_total_limit", "rotate_on_demand",
"checkpoints": [{"path", "step", "kind", "reason", "labels", "bytes",
"created", "world_size", "keep"}]} ("keep" is null without a limit),
"unusable": [{"path", "step", "why", "damaged", "link"}] (checkpoint-<step>
entries that are not complete checkpoints), and "plot": the image's absolute
path with --plot

exit codes: 0 ok (also when there is no checkpoint yet), 1 --plot failed (no
event log, or no matplotlib), 2 usage (a missing folder, or a checkpoint
given as --output-dir)"""


def list_command_parser(subparsers: Any = None) -> argparse.ArgumentParser:
    parser = command_parser(subparsers, "list", "list complete checkpoints on disk", DESCRIPTION, EPILOG)
    parser.add_argument("url", nargs="?", metavar="S3_URL", help="a remote_dir (s3://BUCKET/PREFIX) to list instead")
    add_target_arguments(parser, socket=False)
    parser.add_argument(
        "--save-total-limit",
        type=int,
        metavar="N",
        help="the run's save_total_limit, to show which checkpoints its rotation keeps and which it deletes once "
        "the next one is complete (overrides --config)",
    )
    parser.add_argument(
        "--rotate-on-demand",
        action="store_true",
        default=None,
        help="the run's rotate_on_demand: on-demand checkpoints count toward the limit too (by default only "
        "scheduled ones do)",
    )
    parser.add_argument(
        "--plot",
        metavar="FILE",
        help="also draw the run's save history from its event log into FILE (.png, .svg or .pdf): when each save "
        "finished, how long it took, how long it held training; needs matplotlib",
    )
    add_json_argument(parser)
    if subparsers is not None:
        parser.set_defaults(func=list_command)
    return parser


def list_command(args: argparse.Namespace) -> int:
    if args.url is not None:
        return _list_remote(args)
    try:
        config = read_config(args.config) if args.config is not None else None
        output_dir = output_dir_of(args, config)
        if output_dir is None:
            raise CommandError(EXIT_USAGE, "usage", "say where: --output-dir DIR (or --config FILE)")
        check_output_dir(output_dir)
        limit = (
            args.save_total_limit
            if args.save_total_limit is not None
            else (config.save_total_limit if config else None)
        )
        if limit is not None and limit < 1:
            raise CommandError(EXIT_USAGE, "usage", f"--save-total-limit must be >= 1, got {limit}")
        on_demand = (
            args.rotate_on_demand if args.rotate_on_demand is not None else bool(config and config.rotate_on_demand)
        )
        plot_note = _plot(output_dir, args.plot) if args.plot is not None else None
    except CommandError as exc:
        return fail(args, exc)
    checkpoints, unusable = scan_checkpoints(output_dir)
    victims = {c.path for c in rotation_victims(checkpoints, limit, on_demand=on_demand)}
    rows = [_row(c, None if limit is None else c.path not in victims) for c in checkpoints]
    others = [_unusable_row(u) for u in unusable]
    if args.json:
        plot = {"plot": os.path.abspath(args.plot)} if args.plot is not None else {}
        emit_json(
            {
                "ok": True,
                "output_dir": os.path.abspath(output_dir),
                "save_total_limit": limit,
                "rotate_on_demand": on_demand,
                "checkpoints": rows,
                "unusable": others,
                **plot,
            }
        )
    else:
        print(format_table(rows) if rows else f"no complete checkpoints in {output_dir}")
        for other in others:  # stderr: stdout stays the table; never a silent skip
            state = "damaged" if other["damaged"] else "incomplete"
            print(f"ckptbus list: not usable ({state}): {other['path']}: {other['why']}", file=sys.stderr)
        if plot_note is not None:
            print(f"ckptbus list: {plot_note}", file=sys.stderr)  # stderr: stdout stays the table
    return EXIT_OK


def _list_remote(args: argparse.Namespace) -> int:
    """``ckptbus list s3://...``: the checkpoints in a bucket (boto3 imported only now)."""
    from ._remote import list_rows

    try:
        if args.output_dir is not None or args.plot is not None:
            raise CommandError(EXIT_USAGE, "usage", "give an s3:// URL or --output-dir (and --plot), not both")
        keep = read_config(args.config).remote.keep if args.config is not None else None
        rows, others = list_rows(args.url, keep)
    except CommandError as exc:
        return fail(args, exc)
    if args.json:
        emit_json({"ok": True, "remote_dir": args.url, "remote_keep": keep, "checkpoints": rows, "unusable": others})
        return EXIT_OK
    print(format_table(rows) if rows else f"no complete checkpoints in {args.url}")
    for other in others:
        state = "damaged" if other["damaged"] else "incomplete"
        print(f"ckptbus list: not usable ({state}): {other['path']}: {other['why']}", file=sys.stderr)
    return EXIT_OK


def _plot(output_dir: str, image: str) -> str:
    """Draw the save history of the run in ``output_dir`` into ``image``; returns what to tell the user."""
    log = Path(output_dir) / EVENT_LOG_NAME
    try:
        records = read_save_history(log)
    except FileNotFoundError:
        raise CommandError(
            EXIT_ERROR,
            "no_event_log",
            f"no event log at {log}: the run writes one unless dynamic_checkpoint.event_log is false",
        ) from None
    except OSError as exc:
        raise CommandError(EXIT_ERROR, "no_event_log", f"cannot read {log}: {exc.strerror or exc}") from None
    if not records:
        raise CommandError(EXIT_ERROR, "no_event_log", f"{log} holds no save yet: nothing to plot")
    try:
        plot_save_history(records, image, title=history_title(os.path.abspath(output_dir), records))
    except MatplotlibMissing as exc:
        raise CommandError(EXIT_ERROR, "no_matplotlib", str(exc)) from None
    except (OSError, ValueError) as exc:
        raise CommandError(EXIT_USAGE, "usage", f"cannot write the plot to {image}: {exc}") from None
    return f"save history ({len(records)} saves) drawn in {os.path.abspath(image)}"


def _row(info: CheckpointInfo, keep: bool | None) -> dict[str, Any]:
    m = info.manifest
    return {
        "path": os.path.abspath(info.path),  # usable from any folder, like the paths request prints
        "step": m.step,
        "kind": m.kind,
        "reason": m.reason,
        "labels": list(m.labels),
        "bytes": m.bytes,
        "created": m.created,
        "world_size": m.world_size,
        "keep": keep,
    }


def _unusable_row(unusable: Unusable) -> dict[str, Any]:
    return {
        "path": os.path.abspath(unusable.path),
        "step": unusable.step,
        "why": unusable.why,
        "damaged": unusable.damaged,
        "link": unusable.link,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("STEP", "KIND", "REASON", "LABELS", "SIZE", "CREATED (UTC)", "ROTATION", "PATH")
    lines = [header]
    for r in rows:
        rotation = "-" if r["keep"] is None else ("keep" if r["keep"] else "delete")
        labels = ", ".join(r["labels"]) or "-"
        lines.append(
            (
                str(r["step"]),
                r["kind"],
                r["reason"],
                labels if len(labels) <= 40 else labels[:37] + "...",
                human_size(r["bytes"]),
                r["created"].replace("+00:00", "").replace("T", " "),
                rotation,
                r["path"],
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line[:-1], widths, strict=True)) + "  " + line[-1] for line in lines
    )


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
