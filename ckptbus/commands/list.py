"""``ckptbus list``: the complete checkpoints on disk (no running job needed)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .._layout import CheckpointInfo, list_checkpoints, rotation_victims
from ._common import (
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    add_json_argument,
    add_target_arguments,
    command_parser,
    emit_json,
    fail,
    output_dir_of,
    read_config,
)

DESCRIPTION = """\
List the complete checkpoints in an output directory, oldest first: step, kind,
what asked for it (reason and labels), size, creation time (UTC), and whether
save_total_limit rotation keeps it. The limit is not stored on disk: give it
with --save-total-limit N (and --rotate-on-demand), or --config FILE to read
save_total_limit and rotate_on_demand from the run's config; without either,
the ROTATION column shows '-'. Incomplete directories are not listed."""


def list_command_parser(subparsers: Any = None) -> argparse.ArgumentParser:
    parser = command_parser(subparsers, "list", "list complete checkpoints on disk", DESCRIPTION)
    add_target_arguments(parser, socket=False)
    parser.add_argument(
        "--save-total-limit", type=int, metavar="N", help="the run's save_total_limit (overrides --config)"
    )
    parser.add_argument(
        "--rotate-on-demand",
        action="store_true",
        default=None,
        help="the run's rotate_on_demand: on-demand checkpoints count toward the limit too",
    )
    add_json_argument(parser)
    if subparsers is not None:
        parser.set_defaults(func=list_command)
    return parser


def list_command(args: argparse.Namespace) -> int:
    try:
        config = read_config(args.config) if args.config is not None else None
        output_dir = output_dir_of(args, config)
        if output_dir is None:
            raise CommandError(EXIT_USAGE, "usage", "say where: --output-dir DIR (or --config FILE)")
        if not os.path.isdir(output_dir):
            raise CommandError(EXIT_USAGE, "usage", f"{output_dir} is not a directory")
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
    except CommandError as exc:
        return fail(args, exc)
    checkpoints = list_checkpoints(output_dir)
    victims = {c.path for c in rotation_victims(checkpoints, limit, on_demand=on_demand)}
    rows = [_row(c, None if limit is None else c.path not in victims) for c in checkpoints]
    if args.json:
        emit_json(
            {
                "ok": True,
                "output_dir": os.path.abspath(output_dir),
                "save_total_limit": limit,
                "rotate_on_demand": on_demand,
                "checkpoints": rows,
            }
        )
    else:
        print(format_table(rows) if rows else f"no complete checkpoints in {output_dir}")
    return EXIT_OK


def _row(info: CheckpointInfo, keep: bool | None) -> dict[str, Any]:
    m = info.manifest
    return {
        "path": str(info.path),
        "step": m.step,
        "kind": m.kind,
        "reason": m.reason,
        "labels": list(m.labels),
        "bytes": m.bytes,
        "created": m.created,
        "world_size": m.world_size,
        "keep": keep,
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
