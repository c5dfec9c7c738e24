"""How long a run's saves took, from its event log, and the grace period a scheduler should give it.

A preemption signal is honoured at the end of the step it arrives in or of
the next one, then every rank saves; the scheduler's grace period (SLURM's
``--signal=...@seconds`` and ``KillWait``, Kubernetes'
``terminationGracePeriodSeconds``, torchrun's ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``)
must cover all of it. The rule (docs/schedulers.md): **twice the longest full
save of the run, plus 10 seconds**. The longest save is measured from the
request where the event log holds it (a signal, the trigger file, a socket
request: that includes the step or two the request waited for), else from
the ranks' agreement to the commit. Twice, because a checkpoint grows with
the optimizer state and the disk is slower when the whole cluster is being
preempted at once; 10 s for the ranks to see the signal and the launcher to
forward it.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

from .._names import EVENT_LOG_NAME
from ._save_history import read_save_history

FACTOR: Final = 2.0
MARGIN_SECONDS: Final = 10.0
RULE: Final = "twice the longest full save of this run, plus 10 s"


def grace_period(worst_seconds: float) -> int:
    """The grace period, in whole seconds, for a run whose longest full save took ``worst_seconds``."""
    return math.ceil(FACTOR * worst_seconds + MARGIN_SECONDS)


def save_timings(output_dir: str | os.PathLike[str] | None) -> dict[str, Any]:
    """How long the saves recorded in ``output_dir``'s event log took, per kind, and the grace period to ask for.

    ``{"event_log": path, "full": {...} | None, "weights": {...} | None,
    "grace_period_seconds": int | None, "rule": str}``; each kind has
    ``count``, ``median_seconds``, ``worst_seconds`` (agreement to commit)
    and ``from_request`` (``count``, ``median_seconds``, ``worst_seconds``
    from the request to the commit, or None when the log holds no request
    time). ``grace_period_seconds`` is None until the run made a full save.
    A missing or unreadable log gives the same with ``error`` saying why.
    """
    result: dict[str, Any] = {"event_log": None, "full": None, "weights": None, "grace_period_seconds": None}
    result["rule"] = RULE
    if output_dir is None:
        return {**result, "error": "the run's output_dir is not known"}
    path = Path(output_dir) / EVENT_LOG_NAME
    result["event_log"] = str(path)
    try:
        records = [r for r in read_save_history(path) if r.error is None and r.seconds > 0]
        answered = _from_request(path)
    except OSError as exc:
        return {**result, "error": f"no event log to read ({exc.strerror}): dynamic_checkpoint.event_log is off?"}
    for kind in ("full", "weights"):
        seconds = [r.seconds for r in records if r.kind == kind]
        if seconds:
            result[kind] = {**_figures(seconds), "from_request": _figures(answered.get(kind, ())) or None}
    full = result["full"]
    if full is not None:
        worst = max(full["worst_seconds"], (full["from_request"] or {}).get("worst_seconds", 0.0))
        result["grace_period_seconds"] = grace_period(worst)
    return result


def timing_rows(timings: Any) -> list[tuple[str, str]]:
    """Rows for ``ckptbus status``: each kind's figures and the grace period."""
    if not isinstance(timings, dict):
        return []
    if "error" in timings:
        return [("saves", f"unknown: {timings['error']}")]
    rows = []
    for kind in ("full", "weights"):
        figures = timings.get(kind)
        text = "none in the event log"
        if isinstance(figures, dict):
            text = f"{figures['count']}, {_spread(figures)}"
            asked = figures.get("from_request")
            if isinstance(asked, dict):
                text += f"; from the request: {_spread(asked)}"
        rows.append((f"saves ({kind})", text))
    lead = timings.get("grace_period_seconds")
    if lead is None:
        rows.append(("grace period", "unknown until a full save: touch the trigger file or `ckptbus request`"))
    else:
        rows.append(
            (
                "grace period",
                f"{lead} s or more ({timings['rule']}): --signal=B:TERM@{lead}, and KillWait, "
                "terminationGracePeriodSeconds and TORCH_ELASTIC_SHUTDOWN_TIMEOUT no shorter",
            )
        )
    return rows


def _spread(figures: dict[str, Any]) -> str:
    return f"median {figures['median_seconds']:.2f} s, worst {figures['worst_seconds']:.2f} s"


def _figures(seconds: Iterable[float]) -> dict[str, Any]:
    values = list(seconds)
    if not values:
        return {}
    return {
        "count": len(values),
        "median_seconds": round(statistics.median(values), 3),
        "worst_seconds": round(max(values), 3),
    }


def _from_request(path: Path) -> dict[str, list[float]]:
    """Per kind, the seconds from each request the log holds to the commit of the checkpoint that served it."""
    asked: dict[str, float] = {}  # request id -> when it was asked for
    answered: dict[str, list[float]] = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                event = json.loads(line)
                if event["event"] == "SaveRequested":
                    asked[str(event["request_id"])] = float(event["requested_at"])
                elif event["event"] == "SaveCompleted" and event["seconds"] > 0:
                    times = [asked[r] for r in event["request_ids"] if r in asked]
                    if times:
                        answered.setdefault(str(event["kind"]), []).append(float(event["time"]) - min(times))
            except (ValueError, KeyError, TypeError):
                continue  # another event's line, or one cut short by a full disk
    return answered
