"""A run's save history, read from its event log and drawn for ``ckptbus list --plot``.

matplotlib is not a dependency of ckptbus: it is imported only when a plot is
asked for, and its absence is reported as :class:`MatplotlibMissing`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .._errors import CkptbusError


class MatplotlibMissing(CkptbusError):
    """``--plot`` was asked for, and matplotlib cannot be imported."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveRecord:
    """One save of the run: a ``SaveCompleted`` or a ``SaveFailed`` line of the event log."""

    time: float
    """Unix seconds when the outcome was logged: the checkpoint was complete on disk, or the save had failed."""
    step: int
    kind: str
    reasons: tuple[str, ...]
    seconds: float
    """From the ranks' agreement to the commit (0.0 for a failed save: the log does not say)."""
    stall_seconds: float
    """How long the save held training (the slowest rank)."""
    error: str | None = None
    """Why the save failed; None for a complete checkpoint."""


def read_save_history(path: str | os.PathLike[str]) -> list[SaveRecord]:
    """The saves in the event log at ``path``, in the order they were logged.

    Lines that cannot be read as a save outcome (another event, a line cut by
    a full disk) are skipped. Raises ``OSError`` when the file cannot be read.
    """
    records = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            record = _record(line)
            if record is not None:
                records.append(record)
    return records


def _record(line: str) -> SaveRecord | None:
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("event") not in ("SaveCompleted", "SaveFailed"):
        return None
    try:
        return SaveRecord(
            time=float(data["time"]),
            step=int(data["step"]),
            kind=str(data.get("kind", "full")),
            reasons=tuple(str(r) for r in data.get("reasons", ())),
            seconds=float(data.get("seconds", 0.0)),
            stall_seconds=float(data.get("stall_seconds", 0.0)),
            error=str(data["error"]) if data["event"] == "SaveFailed" else None,
        )
    except (KeyError, TypeError, ValueError):
        return None


def plot_save_history(records: list[SaveRecord], path: str | os.PathLike[str], *, title: str) -> None:
    """Draw ``records`` into the image file ``path`` (its suffix picks the format: png, svg, pdf).

    Top: the step of each save against the time it finished. Bottom: how long
    each save took and how long it held training. Raises :class:`MatplotlibMissing`,
    ``ValueError`` for a format matplotlib cannot write, ``OSError`` when the file cannot be written.
    """
    figure_class, date_formatter = _matplotlib()
    fig: Any = figure_class(figsize=(10, 5.5), layout="constrained")
    when_ax, cost_ax = fig.subplots(2, 1, sharex=True, height_ratios=(1, 1.3))
    done = [r for r in records if r.error is None]
    failed = [r for r in records if r.error is not None]
    for kind, marker in (("full", "o"), ("weights", "s")):
        mine = [r for r in done if r.kind == kind]
        if mine:
            when_ax.plot(_times(mine), [r.step for r in mine], marker, label=f"{kind} checkpoint", alpha=0.8)
    if failed:
        when_ax.plot(_times(failed), [r.step for r in failed], "x", color="red", markersize=9, label="failed save")
        cost_ax.plot(_times(failed), [0] * len(failed), "x", color="red", markersize=9, clip_on=False)
    when_ax.set_ylabel("step")
    # Legends beside the axes: inside, they would hide saves wherever the run happened to put them.
    when_ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    when_ax.grid(alpha=0.3)
    # Stems rather than bars: saves minutes or days apart share one time axis, and a bar's width would need a guess.
    cost_ax.vlines(_times(done), 0, [r.seconds for r in done], color="tab:blue", linewidth=5, alpha=0.35)
    cost_ax.vlines(_times(done), 0, [r.stall_seconds for r in done], color="tab:blue", linewidth=5)
    cost_ax.plot([], [], color="tab:blue", linewidth=5, alpha=0.35, label="save: agreement to\ncheckpoint on disk")
    cost_ax.plot([], [], color="tab:blue", linewidth=5, label="training held")
    if failed:
        cost_ax.plot([], [], "x", color="red", markersize=9, label="failed save")
    cost_ax.set_ylabel("seconds")
    cost_ax.set_ylim(bottom=0)
    cost_ax.set_xlabel("time the save finished (UTC)")
    cost_ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    cost_ax.grid(alpha=0.3)
    cost_ax.xaxis.set_major_formatter(date_formatter(cost_ax.xaxis.get_major_locator(), tz=timezone.utc))
    fig.suptitle(title, fontsize=10)
    fig.savefig(Path(path), dpi=110)


def history_title(output_dir: str, records: list[SaveRecord]) -> str:
    """A title that sums the history up: how many saves, how many failed, how long training was held in all."""
    done = [r for r in records if r.error is None]
    failed = len(records) - len(done)
    held = sum(r.stall_seconds for r in done)
    summary = f"{len(done)} checkpoint{'s' if len(done) != 1 else ''}"
    if failed:
        summary += f", {failed} failed save{'s' if failed != 1 else ''}"
    return f"save history of {output_dir}\n{summary}; training held {held:.1f} s in all"


def _times(records: list[SaveRecord]) -> list[datetime]:
    return [datetime.fromtimestamp(r.time, tz=timezone.utc) for r in records]


def _matplotlib() -> tuple[Any, Any]:
    """matplotlib's ``Figure`` and ``ConciseDateFormatter``, imported now (they are slow to import, and optional)."""
    # Figure, not pyplot: no GUI backend is chosen and no global state is touched.
    try:
        from matplotlib.dates import ConciseDateFormatter
        from matplotlib.figure import Figure
    except ImportError:
        raise MatplotlibMissing(
            "--plot needs matplotlib, which is not installed here: pip install matplotlib"
        ) from None
    return Figure, ConciseDateFormatter
