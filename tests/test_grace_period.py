"""``ckptbus status`` sizes the grace period from the run's own event log: its saves, and the rule on top."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from ckptbus.plugins.sources.unix_socket import UnixSocketTrigger

from ckptbus import Bus
from ckptbus._source import RunInfo
from ckptbus.cli import main
from ckptbus.commands._grace_period import grace_period, save_timings, timing_rows


def _line(event: str, t: float, **fields: Any) -> str:
    return json.dumps({"time": t, "event": event, **fields}) + "\n"


def _completed(t: float, step: int, kind: str, seconds: float, *request_ids: str) -> str:
    return _line(
        "SaveCompleted", t, step=step, kind=kind, reasons=["x"], request_ids=list(request_ids), labels=[],
        exit_after=False, path=f"out/checkpoint-{step}", bytes=1, seconds=seconds, stall_seconds=seconds,
        write_seconds=seconds,
    )  # fmt: skip


# Scheduled full saves of 1.5 and 0.5 s; a SIGTERM at t=1000 answered by a 3.0 s save complete at t=1004.5
# (so 4.5 s from the signal); a failed save; an answer from a checkpoint already on disk (0 s); a weights save.
EVENT_LOG = "".join(
    [
        _completed(100.0, 100, "full", 1.5),
        _completed(200.0, 200, "full", 0.5),
        _line("SaveRequested", 1000.2, kind="full", reason="signal:SIGTERM", request_id="sig-1", requested_at=1000.0),
        _completed(1004.5, 250, "full", 3.0, "sig-1"),
        _line(
            "SaveFailed",
            1100.0,
            step=260,
            kind="full",
            reasons=["socket"],
            request_ids=[],
            labels=[],
            exit_after=False,
            error="disk full",
        ),
        _completed(1101.0, 250, "full", 0.0),
        "a line cut short by a full di\n",
        _completed(1200.0, 300, "weights", 0.4),
    ]
)


def test_figures_per_kind_and_the_rule(tmp_path: Path) -> None:
    (tmp_path / "ckptbus-events.jsonl").write_text(EVENT_LOG)
    timings = save_timings(tmp_path)
    assert timings["full"] == {
        "count": 3,
        "median_seconds": 1.5,
        "worst_seconds": 3.0,
        "from_request": {"count": 1, "median_seconds": 4.5, "worst_seconds": 4.5},
    }
    assert timings["weights"] == {"count": 1, "median_seconds": 0.4, "worst_seconds": 0.4, "from_request": None}
    # The worst full save counts from the signal when the log says when it came: 2 x 4.5 s + 10 s.
    assert timings["grace_period_seconds"] == grace_period(4.5) == 19
    rows = dict(timing_rows(timings))
    assert rows["saves (full)"] == "3, median 1.50 s, worst 3.00 s; from the request: median 4.50 s, worst 4.50 s"
    assert rows["grace period"].startswith("19 s or more (twice the longest full save of this run, plus 10 s)")
    assert "--signal=B:TERM@19" in rows["grace period"]


def test_the_rule_rounds_up() -> None:
    assert grace_period(0.01) == 11
    assert grace_period(60.0) == 130
    assert grace_period(7.3) == math.ceil(2 * 7.3 + 10)


def test_without_a_full_save_or_a_log(tmp_path: Path) -> None:
    timings = save_timings(tmp_path)
    assert timings["grace_period_seconds"] is None and "no event log" in timings["error"]
    assert timing_rows(timings) == [("saves", f"unknown: {timings['error']}")]
    (tmp_path / "ckptbus-events.jsonl").write_text(_completed(1.0, 5, "weights", 0.2))
    timings = save_timings(tmp_path)
    assert timings["full"] is None and timings["grace_period_seconds"] is None
    assert dict(timing_rows(timings))["grace period"].startswith("unknown until a full save")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Path]:
    """A run's socket served from ``tmp_path``, whose event log holds :data:`EVENT_LOG`."""
    (tmp_path / "ckptbus-events.jsonl").write_text(EVENT_LOG)
    trigger = UnixSocketTrigger(timeout=2.0)
    trigger.start(Bus(), RunInfo(rank=0, world_size=2, output_dir=tmp_path, status=lambda: {"step": 7}))
    yield tmp_path
    trigger.close()


def test_status_shows_them(served: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--output-dir", str(served)]) == 0
    out = capsys.readouterr().out
    assert "saves (full):     3, median 1.50 s, worst 3.00 s" in out
    assert "saves (weights):  1, median 0.40 s, worst 0.40 s" in out
    assert "grace period:     19 s or more" in out
    assert main(["status", "--output-dir", str(served), "--json"]) == 0
    saves = json.loads(capsys.readouterr().out)["status"]["saves"]
    assert saves["grace_period_seconds"] == 19 and saves["event_log"] == str(served / "ckptbus-events.jsonl")


# -- docs/schedulers.md says the same ---------------------------------------------------------------

DOC = (Path(__file__).resolve().parent.parent / "docs" / "schedulers.md").read_text(encoding="utf-8")


def _block_after(marker: str) -> str:
    """The fenced block right after the line ``marker`` in docs/schedulers.md (or after the first fence)."""
    rest = DOC.split(marker, 1)[1]
    return rest.split("```", 2)[1].split("\n", 1)[1]


def test_the_documented_status_lines_are_what_status_prints() -> None:
    shown = _block_after("long its saves took and what to ask the scheduler for:\n").splitlines()
    asked = {"count": 14, "median_seconds": 2.6, "worst_seconds": 4.1}
    full: dict[str, Any] = {"count": 14, "median_seconds": 2.1, "worst_seconds": 3.4, "from_request": asked}
    timings = {"full": full, "weights": None, "grace_period_seconds": grace_period(4.1), "rule": "x"}
    printed = [f"{name + ':':<18}{value}" for name, value in timing_rows(timings)]
    assert shown[:2] == printed[:2]
    assert shown[2].startswith(printed[2].split(" (")[0] + " (twice the longest full save of this run, plus 10 s)")


def test_the_pod_spec_follows_the_rule() -> None:
    spec = yaml.safe_load(_block_after("<!-- kubernetes -->"))["spec"]
    (container,) = spec["containers"]
    shutdown = int(next(e["value"] for e in container["env"] if e["name"] == "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"))
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"][-1]
    assert pre_stop.startswith("sleep ")
    # The period holds the hook and the grace period; torchrun's timeout is that grace period.
    assert spec["terminationGracePeriodSeconds"] == int(pre_stop.split()[1]) + shutdown
    assert container["command"][-1].startswith("exec accelerate launch")
