"""The ``ckptbus`` command: request, status, list; output for people and programs; exit codes.

Fast tests run the CLI in this process against a server in this process (the
test plays the sink); the slow ones run the installed ``ckptbus`` script
against a real 2-rank ``accelerate launch`` run.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from ckptbus.plugins.sources.unix_socket import UnixSocketTrigger
from runs import BIN, TrainingRun

from ckptbus import Bus, SaveCompleted, SaveFailed, SaveRequested, list_checkpoints, read_checkpoint
from ckptbus._layout import rotation_victims
from ckptbus._names import POINTER_NAME, SOCKET_NAME
from ckptbus._socket_path import MAX_SOCKET_PATH_BYTES
from ckptbus._source import RunInfo
from ckptbus.cli import get_parser, main
from ckptbus.commands._common import (
    EXIT_OK,
    EXIT_SAVE_FAILED,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
)
from ckptbus.commands._save_history import read_save_history
from ckptbus.commands.status import _absolute_paths

CKPTBUS = str(BIN / "ckptbus")


def cli(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``ckptbus argv`` in this process; returns (exit code, stdout, stderr)."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def script(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the installed ``ckptbus`` script."""
    return subprocess.run([CKPTBUS, *argv], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[UnixSocketTrigger, list[SaveRequested]]]:
    bus = Bus()
    requests: list[SaveRequested] = []
    bus.subscribe("save_requested", requests.append)
    trigger = UnixSocketTrigger(timeout=2.0)
    trigger.start(
        bus, RunInfo(rank=0, world_size=1, output_dir=tmp_path, status=lambda: {"step": 42, "pending_requests": 0})
    )
    yield trigger, requests
    trigger.close()


def answer_when_asked(
    trigger: UnixSocketTrigger, requests: list[SaveRequested], outcome: str, path: str = "/x/checkpoint-42"
) -> threading.Thread:
    """Play the sink: once a request arrives, publish its outcome (a checkpoint at ``path``)."""

    def run() -> None:
        deadline = time.monotonic() + 20
        while not requests and time.monotonic() < deadline:
            time.sleep(0.01)
        request = requests[0]
        common: dict[str, Any] = {
            "step": 42,
            "kind": request.kind,
            "reasons": ("socket",),
            "request_ids": (request.request_id,),
            "labels": (request.label,) if request.label else (),
            "exit_after": False,
        }
        if outcome == "completed":
            trigger.bus.publish(SaveCompleted(path=path, bytes=1, seconds=0.1, **common))
        else:
            trigger.bus.publish(SaveFailed(error="writing: OSError: [Errno 28] No space left on device", **common))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


# -- no torch, fast start -----------------------------------------------------------


def test_cli_imports_no_torch() -> None:
    code = (
        "import sys, ckptbus.cli, ckptbus.commands.request, ckptbus.commands.status, ckptbus.commands.list;"
        "heavy = {'torch', 'accelerate', 'transformers', 'numpy', 'matplotlib'};"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_help_lists_the_commands() -> None:
    out = script("--help")
    assert out.returncode == 0
    for command in ("request", "status", "list"):
        assert command in out.stdout
    assert "exit codes" in out.stdout and "ckptbus COMMAND --help" in out.stdout


@pytest.mark.parametrize("command", ["request", "status", "list"])
def test_help_stands_alone(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Every option says what it does, and the help points to nothing a pip user lacks (docs/ is not installed)."""
    assert main([command, "--help"]) == 0  # argparse's exit, turned into main's return (stdout flushed first)
    out = capsys.readouterr().out
    assert "exit codes" in out and "--json" in out and "docs/" not in out
    subparsers = next(a for a in get_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for action in subparsers.choices[command]._actions:
        assert action.help and len(action.help) > 20, action.option_strings


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli("--version", capsys=capsys)
    assert code == EXIT_OK and out == f"ckptbus {importlib.metadata.version('ckptbus')}\n"


@pytest.mark.parametrize(("typed", "meant"), [("lst", "list"), ("stauts", "status"), ("reqest", "request")])
def test_did_you_mean(typed: str, meant: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(typed, "--output-dir", ".", capsys=capsys)
    assert (code, out) == (EXIT_USAGE, "")
    assert f"did you mean {meant!r}?" in err


# -- usage errors (exit 2) --------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["explode"],
        ["request"],
        ["status"],
        ["list"],
        ["request", "--output-dir", "x", "--kind", "half"],
        ["request", "--output-dir", "x", "--label", "x" * 300],
        ["request", "--output-dir", "x", "--label", "two\nlines"],
        ["request", "--output-dir", "x", "--timeout", "0"],
        ["request", "--output-dir", "x", "--socket", "y"],
        ["status", "--output-dir", "x", "--timeout", "-1"],
        ["list", "--output-dir", "/no/such/dir"],
        ["list", "--output-dir", ".", "--save-total-limit", "0"],
        ["status", "--config", "/no/such/config.yaml"],
    ],
)
def test_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(*argv, capsys=capsys)
    assert code == EXIT_USAGE, (out, err)
    assert err  # says what is wrong


def test_usage_error_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli("list", "--output-dir", "/no/such/dir", "--json", capsys=capsys)
    assert code == EXIT_USAGE
    assert json.loads(out) == {
        "ok": False,
        "exit_code": EXIT_USAGE,
        "error": {"code": "usage", "message": "output directory /no/such/dir does not exist"},
    }


@pytest.mark.parametrize(
    "argv",
    [
        ["request", "--output-dir", "x", "--kind", "half", "--json"],
        ["status", "--output-dir", "x", "--timeout", "soon", "--json"],
        ["lst", "--json"],
    ],
)
def test_argparse_errors_as_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Bad arguments get the same JSON envelope as every other error, not argparse's text."""
    code, out, err = cli(*argv, capsys=capsys)
    reply = json.loads(out)
    assert code == EXIT_USAGE == reply["exit_code"] and err == ""
    assert reply["ok"] is False and reply["error"]["code"] == "usage" and reply["error"]["message"]


@pytest.mark.parametrize("command", ["status", "request"])
def test_missing_output_dir(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing folder is named as such, not as a missing socket inside it."""
    missing = tmp_path / "nonexistent"
    code, out, err = cli(command, "--output-dir", str(missing), capsys=capsys)
    assert (code, out) == (EXIT_USAGE, "")
    assert f"output directory {missing} does not exist" in err and "socket" not in err


def test_missing_relative_output_dir_says_where_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("status", "--output-dir", "outputs/tiny", capsys=capsys)
    assert code == EXIT_USAGE
    assert f"from {tmp_path}" in err and "relative to the folder the run was started in" in err


@pytest.mark.parametrize("command", ["list", "status", "request"])
def test_checkpoint_given_as_output_dir(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = tmp_path / "out" / "checkpoint-338"
    checkpoint.mkdir(parents=True)
    (checkpoint / "ckptbus.json").write_text("{}")
    code, out, err = cli(command, "--output-dir", str(checkpoint), capsys=capsys)
    assert (code, out) == (EXIT_USAGE, "")
    assert "is a checkpoint" in err and f"--output-dir {tmp_path / 'out'}" in err
    # Without its manifest (a Trainer's own, or an incomplete one), the name says it too.
    (checkpoint / "ckptbus.json").unlink()
    code, out, _ = cli(command, "--output-dir", str(checkpoint), "--json", capsys=capsys)
    assert code == EXIT_USAGE and "is a checkpoint" in json.loads(out)["error"]["message"]


def test_output_dir_named_like_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A folder that holds no checkpoint is an (empty) output directory, whatever its name."""
    (tmp_path / "checkpoint-1").mkdir()
    code, out, _ = cli("list", "--output-dir", str(tmp_path), capsys=capsys)
    assert code == EXIT_OK and "no complete checkpoints" in out


# -- run not reachable (exit 3) -----------------------------------------------------------


def test_no_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli("request", "--output-dir", str(tmp_path), capsys=capsys)
    assert code == EXIT_UNREACHABLE and out == ""
    assert "no socket at" in err and str(tmp_path / SOCKET_NAME) in err


def test_stale_socket(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / SOCKET_NAME))
    stale.close()
    code, _, err = cli("status", "--output-dir", str(tmp_path), capsys=capsys)
    assert code == EXIT_UNREACHABLE and "stale socket" in err


def test_not_a_socket(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / SOCKET_NAME).write_text("hello")
    code, out, _ = cli("status", "--output-dir", str(tmp_path), "--json", capsys=capsys)
    assert code == EXIT_UNREACHABLE
    error = json.loads(out)["error"]
    assert error["code"] == "unreachable" and "is not a socket" in error["message"]
    assert (tmp_path / SOCKET_NAME).read_text() == "hello"


# -- against a server in this process ----------------------------------------------------------


def test_request_waits_and_prints_the_path(server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trigger, requests = server
    answering = answer_when_asked(trigger, requests, "completed")
    code, out, err = cli("request", "--output-dir", str(tmp_path), "--label", "before lr drop", capsys=capsys)
    answering.join()
    assert (code, out) == (EXIT_OK, "/x/checkpoint-42\n")
    assert "waiting" in err
    assert (requests[0].kind, requests[0].reason, requests[0].label) == ("full", "socket", "before lr drop")


def test_request_prints_an_absolute_path(
    server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run with a relative output_dir names its checkpoints relative to its own folder; the CLI prints them
    absolute, found through the output_dir it was given (here relative, from elsewhere)."""
    trigger, requests = server
    (tmp_path / "checkpoint-42").mkdir()
    monkeypatch.chdir(tmp_path.parent)
    answering = answer_when_asked(trigger, requests, "completed", path="outputs/tiny/checkpoint-42")
    code, out, _ = cli("request", "--output-dir", tmp_path.name, "--json", capsys=capsys)
    answering.join()
    assert code == EXIT_OK and json.loads(out)["path"] == str(tmp_path / "checkpoint-42")


def test_request_absolute_path_through_the_socket(
    server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --socket alone the output_dir is unknown here: the run's status gives it (absolute)."""
    trigger, requests = server
    answering = answer_when_asked(trigger, requests, "completed", path="outputs/tiny/checkpoint-42")
    code, out, _ = cli("request", "--socket", str(trigger.path), capsys=capsys)
    answering.join()
    assert (code, out) == (EXIT_OK, f"{tmp_path.resolve() / 'checkpoint-42'}\n")


def test_status_last_checkpoint_absolute() -> None:
    status = {"output_dir": "/home/me/outputs/tiny", "last_checkpoint": "outputs/tiny/checkpoint-7"}
    assert _absolute_paths(status)["last_checkpoint"] == "/home/me/outputs/tiny/checkpoint-7"
    status["last_checkpoint"] = "/elsewhere/checkpoint-7"
    assert _absolute_paths(status)["last_checkpoint"] == "/elsewhere/checkpoint-7"


def test_request_json(server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trigger, requests = server
    answering = answer_when_asked(trigger, requests, "completed")
    code, out, err = cli("request", "--socket", str(trigger.path), "--kind", "weights", "--json", capsys=capsys)
    answering.join()
    reply = json.loads(out)
    assert code == EXIT_OK and err == ""
    assert reply["state"] == "completed" and reply["path"] == "/x/checkpoint-42" and reply["kind"] == "weights"


def test_request_no_wait(server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, requests = server
    code, out, _ = cli("request", "--output-dir", str(tmp_path), "--no-wait", capsys=capsys)
    assert code == EXIT_OK and out.strip() == requests[0].request_id
    code, out, _ = cli("request", "--output-dir", str(tmp_path), "--no-wait", "--json", capsys=capsys)
    reply = json.loads(out)
    assert reply["state"] == "queued" and reply["request_id"] == requests[0].request_id and reply["shared"] is True


def test_save_failed(server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trigger, requests = server
    answering = answer_when_asked(trigger, requests, "failed")
    code, out, err = cli("request", "--output-dir", str(tmp_path), capsys=capsys)
    answering.join()
    assert code == EXIT_SAVE_FAILED and out == ""
    assert "the checkpoint was not saved" in err and "No space left on device" in err


def test_save_failed_json(server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trigger, requests = server
    answering = answer_when_asked(trigger, requests, "failed")
    code, out, _ = cli("request", "--output-dir", str(tmp_path), "--json", capsys=capsys)
    answering.join()
    reply = json.loads(out)
    assert code == EXIT_SAVE_FAILED == reply["exit_code"]
    assert reply["ok"] is False and reply["error"]["code"] == "save_failed"


def test_timeout(server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    code, _, err = cli("request", "--output-dir", str(tmp_path), "--timeout", "0.5", capsys=capsys)
    assert code == EXIT_TIMEOUT and time.monotonic() - started < 10
    assert "stays queued" in err


def test_run_ending_while_waiting(server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trigger, requests = server

    def close_when_asked() -> None:
        while not requests:
            time.sleep(0.01)
        trigger.close()

    closer = threading.Thread(target=close_when_asked)
    closer.start()
    code, _, err = cli("request", "--output-dir", str(tmp_path), capsys=capsys)
    closer.join()
    assert code == EXIT_SAVE_FAILED and "the run ended first" in err


def test_status_plain_and_json(server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli("status", "--output-dir", str(tmp_path), capsys=capsys)
    assert code == EXIT_OK
    assert "step:             42" in out and "last checkpoint:  none yet" in out and "pending requests: 0" in out
    code, out, _ = cli("status", "--output-dir", str(tmp_path), "--json", capsys=capsys)
    reply = json.loads(out)
    assert code == EXIT_OK and reply["ok"] is True
    assert reply["status"]["step"] == 42 and reply["status"]["pid"] == os.getpid()


def test_config_names_the_run(server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path), "max_steps": 10, "model": {"n_layer": 1}}))
    code, out, _ = cli("status", "--config", str(config), "--json", capsys=capsys)
    assert code == EXIT_OK and json.loads(out)["status"]["step"] == 42


# -- list --plot: the save history from the event log --------------------------------------------

EVENT_LOG = """\
{"time": 1746093600.0, "event": "SaveRequested", "kind": "full", "reason": "schedule", "label": null}
{"time": 1746093601.5, "event": "SaveCompleted", "step": 100, "kind": "full", "reasons": ["schedule"], \
"request_ids": ["r1"], "labels": [], "exit_after": false, "path": "out/checkpoint-100", "bytes": 10, \
"seconds": 1.5, "stall_seconds": 0.2, "write_seconds": 1.3}
{"time": 1746093900.0, "event": "SaveFailed", "step": 300, "kind": "full", "reasons": ["socket"], \
"request_ids": ["r2"], "labels": [], "exit_after": false, "error": "writing: OSError: [Errno 28] No space left"}
not json: a line cut short by a full disk
{"time": 1746094200.0, "event": "SaveCompleted", "step": 500, "kind": "weights", "reasons": ["socket"], \
"request_ids": ["r3"], "labels": ["before lr drop"], "exit_after": false, "path": "out/checkpoint-500", \
"bytes": 5, "seconds": 0.4, "stall_seconds": 0.4, "write_seconds": 0.3}
"""


@pytest.fixture
def run_with_history(tmp_path: Path) -> Path:
    """An output_dir with a hand-written event log: two checkpoints, a failed save, other events, a bad line."""
    (tmp_path / "ckptbus-events.jsonl").write_text(EVENT_LOG)
    return tmp_path


def test_read_save_history(run_with_history: Path) -> None:
    records = read_save_history(run_with_history / "ckptbus-events.jsonl")
    assert [(r.step, r.kind, r.error is None) for r in records] == [
        (100, "full", True),
        (300, "full", False),
        (500, "weights", True),
    ]
    assert (records[0].seconds, records[0].stall_seconds) == (1.5, 0.2)
    assert records[1].error is not None and "No space left" in records[1].error


def test_list_plot(run_with_history: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    image = tmp_path / "history.png"
    code, out, err = cli("list", "--output-dir", str(run_with_history), "--plot", str(image), capsys=capsys)
    assert code == EXIT_OK, err
    assert "no complete checkpoints" in out  # the table (here: none on disk) stays on stdout
    assert "3 saves" in err and str(image) in err
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = tmp_path / "history.svg"
    code, out, _ = cli("list", "--output-dir", str(run_with_history), "--plot", str(svg), "--json", capsys=capsys)
    assert code == EXIT_OK and json.loads(out)["plot"] == str(svg)
    assert b"<svg" in svg.read_bytes()


def test_list_plot_without_matplotlib(
    run_with_history: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # matplotlib is installed here (a dev extra); None in sys.modules makes its import fail as if it were not.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    image = tmp_path / "history.png"
    code, out, _ = cli("list", "--output-dir", str(run_with_history), "--plot", str(image), "--json", capsys=capsys)
    error = json.loads(out)["error"]
    assert code == 1 and error["code"] == "no_matplotlib" and "pip install matplotlib" in error["message"]
    assert not image.exists()


def test_list_plot_without_event_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli("list", "--output-dir", str(tmp_path), "--plot", str(tmp_path / "h.png"), capsys=capsys)
    assert (code, out) == (1, "")
    assert "no event log" in err and "event_log" in err
    (tmp_path / "ckptbus-events.jsonl").write_text('{"time": 1.0, "event": "SaveRequested"}\n')
    code, _, err = cli("list", "--output-dir", str(tmp_path), "--plot", str(tmp_path / "h.png"), capsys=capsys)
    assert code == 1 and "no save yet" in err


# -- against a real 2-rank run -------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainingRun]:
    run = TrainingRun(tmp_path_factory.mktemp("cli"), config={"save_steps": 20}).start()
    try:
        run.wait_for(lambda: (run.output_dir / SOCKET_NAME).exists() and run.last_step() >= 1, "the socket")
        yield run
    finally:
        run.kill()


@pytest.mark.slow
def test_live_request_prints_a_complete_checkpoint(live: TrainingRun) -> None:
    out = script("request", "--output-dir", str(live.output_dir), "--label", "before lr drop")
    assert out.returncode == 0, out.stderr
    info = read_checkpoint(out.stdout.strip())
    assert info.manifest.labels == ["before lr drop"] and info.manifest.kind == "full"
    assert info.manifest.world_size == 2


@pytest.mark.slow
def test_live_weights_no_wait(live: TrainingRun) -> None:
    out = script(
        "request", "--output-dir", str(live.output_dir), "--kind", "weights", "--label", "w", "--no-wait", "--json"
    )
    assert out.returncode == 0, out.stderr
    queued = json.loads(out.stdout)
    assert queued["state"] == "queued" and queued["kind"] == "weights"
    done = live.wait_for(
        lambda: [
            e for e in live.events() if e["event"] == "SaveCompleted" and queued["request_id"] in e["request_ids"]
        ],
        "the weights checkpoint",
    )
    info = read_checkpoint(done[0]["path"])
    assert "w" in info.manifest.labels and (info.path / "model.safetensors").exists()


@pytest.mark.slow
def test_live_status(live: TrainingRun) -> None:
    out = script("status", "--output-dir", str(live.output_dir))
    assert out.returncode == 0, out.stderr
    assert "step:" in out.stdout and "processes:        2" in out.stdout
    out = script("status", "--output-dir", str(live.output_dir), "--json")
    reply = json.loads(out.stdout)
    assert reply["ok"] is True and reply["status"]["world_size"] == 2 and reply["status"]["step"] >= 1


@pytest.mark.slow
def test_live_list(live: TrainingRun, tmp_path: Path) -> None:
    live.wait_for(lambda: len(list_checkpoints(live.output_dir)) >= 3, "three checkpoints")
    assert script("request", "--output-dir", str(live.output_dir), "--label", "mine").returncode == 0
    out = script("list", "--output-dir", str(live.output_dir), "--save-total-limit", "1", "--json")
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    on_disk = {str(c.path): c for c in list_checkpoints(live.output_dir)}
    rows = {row["path"]: row for row in listed["checkpoints"]}
    assert set(rows) <= set(on_disk)  # the run has no save_total_limit: it only adds checkpoints
    victims = {str(c.path) for c in rotation_victims([on_disk[p] for p in rows], 1)}
    assert {p for p, r in rows.items() if r["keep"] is False} == victims
    assert victims  # scheduled ones beyond the newest
    mine = [r for r in rows.values() if "mine" in r["labels"]]
    assert mine and mine[0]["keep"] is True and "socket" in mine[0]["reason"]
    # Plain output: a header and one line per checkpoint.
    out = script("list", "--output-dir", str(live.output_dir))
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["STEP", "KIND", "REASON"] and len(lines) >= 4
    assert all(line.split()[-2] == "-" for line in lines[1:])  # no limit given: no rotation column
    # --config reads save_total_limit (and output_dir) from the run's config.
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**live.config, "save_total_limit": 1}))
    out = script("list", "--config", str(config), "--json")
    assert json.loads(out.stdout)["save_total_limit"] == 1


@pytest.mark.slow
def test_live_long_output_dir(tmp_path: Path) -> None:
    output_dir = tmp_path / ("a-rather-long-directory-name-" * 3) / ("and-another-one-" * 3)
    assert len(os.fsencode(output_dir / SOCKET_NAME)) > MAX_SOCKET_PATH_BYTES
    run = TrainingRun(tmp_path, config={"output_dir": str(output_dir), "max_steps": 400}).start()
    try:
        run.wait_for(lambda: (output_dir / POINTER_NAME).exists() and run.last_step() >= 1, "the pointer file")
        sock = Path((output_dir / POINTER_NAME).read_text().strip())
        assert len(os.fsencode(sock)) <= MAX_SOCKET_PATH_BYTES
        out = script("request", "--output-dir", str(output_dir), "--label", "long")
        assert out.returncode == 0, out.stderr + run.log_tail()
        assert read_checkpoint(out.stdout.strip()).manifest.labels == ["long"]
        assert run.wait_exit() == 0
        assert not sock.exists() and not (output_dir / POINTER_NAME).exists()
    finally:
        run.kill()


# -- issue 24: config files YAML cannot read, --json whatever happens, closed stdout, the wrong run ------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"output_dir: out\nseed: \xff\n", "the config file is not UTF-8 text (byte 0xff on line 2, offset 22)"),
        (("output_dir: " + "[" * 5000 + "]" * 5000 + "\n").encode(), "the config file nests too deeply"),
    ],
    ids=["encoding", "nesting"],
)
@pytest.mark.parametrize("command", ["request", "status", "list"])
def test_a_config_yaml_cannot_read_is_a_usage_error_naming_the_file(
    command: str, content: bytes, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "run.yaml"
    config.write_bytes(content)
    code, out, err = cli(command, "--config", str(config), capsys=capsys)
    assert (code, out) == (EXIT_USAGE, "")
    assert err.startswith(f"ckptbus {command}: {config}: {expected}") and err.count("\n") == 1, err
    code, out, err = cli(command, "--config", str(config), "--json", capsys=capsys)
    reply = json.loads(out)  # exactly one object
    assert (code, reply["ok"], reply["exit_code"], reply["error"]["code"]) == (EXIT_USAGE, False, EXIT_USAGE, "usage")
    assert reply["error"]["message"].startswith(f"{config}: {expected}")


def test_an_unexpected_error_still_prints_one_json_object(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in a command (here: one forced by patching, as no real input is known to cause one)."""
    import ckptbus.commands.status as status_module

    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(status_module, "target_of", broken)
    code, out, err = cli("status", "--output-dir", str(tmp_path), "--json", capsys=capsys)
    reply = json.loads(out)
    assert code == 1 and reply == {
        "ok": False,
        "exit_code": 1,
        "error": {"code": "internal", "message": "unexpected error: RuntimeError: a bug"},
    }
    assert "Traceback" in err, "the traceback goes to stderr, for a bug report"
    code, out, err = cli("status", "--output-dir", str(tmp_path), capsys=capsys)
    assert (code, out) == (1, "") and err.rstrip().endswith("ckptbus: unexpected error: RuntimeError: a bug")


def _with_closed_reader(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run the installed ckptbus with stdout a pipe whose reader is gone (``| head`` that ended first)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([CKPTBUS, *argv], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)


@pytest.mark.parametrize(
    "argv",
    [["status"], ["status", "--json"], ["list"], ["request", "--no-wait"], ["--help"], ["nope", "--json"]],
    ids=["status", "status-json", "list", "request", "help", "usage-json"],
)
def test_a_closed_stdout_ends_quietly_with_141(server: Any, tmp_path: Path, argv: list[str]) -> None:
    if argv[0] not in ("--help", "nope"):
        argv = [*argv, "--output-dir", str(tmp_path)]
    done = _with_closed_reader(argv)
    # argparse's help swallows its own write errors: it ends quietly too, with its usual 0.
    expected = 0 if argv == ["--help"] else 141
    assert (done.returncode, done.stderr) == (expected, ""), done.stderr


def test_status_piped_into_head_prints_no_traceback(server: Any, tmp_path: Path) -> None:
    done = subprocess.run(
        f"{CKPTBUS} status --output-dir {tmp_path} | head -2",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.splitlines()[0] == f"output_dir:       {tmp_path}"


def test_a_stdout_closed_from_the_start_is_not_a_traceback(server: Any, tmp_path: Path) -> None:
    done = subprocess.run(
        [CKPTBUS, "status", "--output-dir", str(tmp_path), "--json"],
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        preexec_fn=lambda: os.close(1),  # what `ckptbus status >&-` starts with
    )
    assert (done.returncode, done.stderr) == (EXIT_OK, "")


def _config_sharing_the_socket(directory: Path, output_dir: str, socket_path: Path) -> Path:
    config = directory / f"{Path(output_dir).name}.yaml"
    text = {"output_dir": output_dir, "dynamic_checkpoint": {"enabled": True, "socket": {"path": str(socket_path)}}}
    config.write_text(yaml.safe_dump(text))
    return config


@pytest.mark.parametrize("command", ["request", "status"])
def test_the_run_that_answers_a_shared_socket_path_must_be_the_one_named(
    command: str, server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Runs A (output_dir tmp_path, serving) and B share socket.path: asking for B must not reach A."""
    trigger, requests = server
    other = tmp_path / "b"
    other.mkdir()
    config_b = _config_sharing_the_socket(tmp_path, str(other), trigger.path)
    code, out, err = cli(command, "--config", str(config_b), capsys=capsys)
    assert (code, out) == (EXIT_UNREACHABLE, ""), err
    assert err.startswith(
        f"ckptbus {command}: the run at {trigger.path} serves output_dir {tmp_path.resolve()} (pid {os.getpid()}), "
        f"not {other}: two runs' configs share dynamic_checkpoint.socket.path"
    ), err
    assert "Give each run its own socket.path" in err
    code, out, _ = cli(command, "--config", str(config_b), "--json", capsys=capsys)
    reply = json.loads(out)
    assert (code, reply["exit_code"], reply["error"]["code"]) == (EXIT_UNREACHABLE, EXIT_UNREACHABLE, "wrong_run")
    assert requests == [], "run A was never asked for a checkpoint"
    # The run named by its own config (or by --socket, which names no output_dir) is served.
    config_a = _config_sharing_the_socket(other, str(tmp_path), trigger.path)
    if command == "status":
        assert cli(command, "--config", str(config_a), capsys=capsys)[0] == EXIT_OK
        assert cli(command, "--socket", str(trigger.path), capsys=capsys)[0] == EXIT_OK
    else:
        answering = answer_when_asked(trigger, requests, "completed")
        code, out, err = cli(command, "--config", str(config_a), capsys=capsys)
        answering.join()
        assert (code, out) == (EXIT_OK, "/x/checkpoint-42\n"), err


def test_a_relative_output_dir_not_found_here_is_matched_by_its_end(
    server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative output_dir is relative to where the run started: from elsewhere, the run's must end with it."""
    trigger, _ = server
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    same = _config_sharing_the_socket(elsewhere, tmp_path.name, trigger.path)
    assert cli("status", "--config", str(same), capsys=capsys)[0] == EXIT_OK
    (elsewhere / "x").mkdir()
    other = _config_sharing_the_socket(elsewhere, "x", trigger.path)
    assert cli("status", "--config", str(other), capsys=capsys)[0] == EXIT_UNREACHABLE
    missing = _config_sharing_the_socket(elsewhere, "runs/b", trigger.path)
    assert cli("status", "--config", str(missing), capsys=capsys)[0] == EXIT_UNREACHABLE
