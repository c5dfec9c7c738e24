"""How long an on-demand checkpoint takes to arrive, against a real training run.

    python -m benchmarks.latency [--trials 20] [--check-interval 10] [--seed 0] [--n-layer 2] [--n-embd 64]
                                 [--no-weights] [--budget 300] [--keep] [--out benchmarks/results/latency.json]
                                 [--smoke]

(from the repository root).
Plain python, not under the launcher: it starts ``accelerate launch --multi_gpu
--num_processes 2 train.py`` itself (its own session, a config written into a
temporary directory: ``configs/tiny.yaml``'s model, a very large ``max_steps``,
no ``save_steps``, ``check_interval`` 10, ``save_total_limit`` with
``rotate_on_demand`` so the disk does not fill), waits until ``metrics.jsonl``
shows training, then runs trials one after the other, each only once the
previous checkpoint is committed, with a random (seeded) pause between
them (``--pause``, 0.5-2 s) so that they land at random phases of the check
interval. The kinds of a round go in a shuffled order:

- ``file``: touch ``<output_dir>/axolotl_checkpoint.save`` -> the
  ``SaveCompleted`` line of ``ckptbus-events.jsonl`` (its unix ``time`` is when
  the checkpoint, manifest included, was committed). Expected: up to
  ``check_interval`` steps (the file is looked at every ``check_interval``
  steps) plus the save.
- ``request full`` / ``request weights``: the wall time of the whole
  ``ckptbus request --output-dir DIR --json`` process (start-up included; it
  prints once the checkpoint is committed). Also recorded: the time at which
  the request reached the run (its ``SaveRequested`` event) and the commit.
  ``ckptbus --help`` (start-up alone) and ``ckptbus status`` (start-up and
  one socket round trip) are timed once a round under the same load.

Steps: the committed step minus the last step ``metrics.jsonl`` had logged at
the touch / when the CLI was started (``train.py`` writes one line per
optimizer step with its unix ``time``, so the resolution is one step). At
the end the run is stopped with SIGTERM to its process group (SIGKILL after
120 s). Results: benchmarks/results/latency.json and latency.png.

``--smoke``: one trial of each kind, short pauses: every kind end to end in
seconds, the result checked and written to a temporary directory
(benchmarks/output.py).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from benchmarks.output import add_smoke_option, default_out, write_result
from testkit.procs import free_port, wait_for

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TRIGGER = "axolotl_checkpoint.save"


def tool(name: str) -> str:
    return shutil.which(name, path=str(BIN)) or name


class JsonlTail:
    """Reads the complete lines appended to a JSON-lines file since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def poll(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]


class Run:
    """The training run: its process group, and what it logged (metrics and events)."""

    def __init__(self, cmd: list[str], output_dir: Path, log_path: Path) -> None:
        self.cmd = cmd
        self.output_dir = output_dir
        self.log_path = log_path
        self.metrics = JsonlTail(output_dir / "metrics.jsonl")
        self.events_tail = JsonlTail(output_dir / "ckptbus-events.jsonl")
        self.steps: list[int] = []
        self.times: list[float] = []
        self.events: list[dict[str, Any]] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def poll(self) -> None:
        for record in self.metrics.poll():
            self.steps.append(int(record["step"]))
            self.times.append(float(record["time"]))
        self.events.extend(self.events_tail.poll())
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"training exited with status {self.proc.returncode}; see the log:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_for(self, what: str, found: Callable[[], Any], timeout: float, interval: float = 0.02) -> Any:
        """What ``found`` returns once it is not None (nor empty), reading the run's new lines between tries."""

        def polled() -> Any:
            self.poll()
            return found()

        return wait_for(polled, what, timeout, interval=interval, details=lambda: f"log:\n{self.log_tail()}")

    def event(self, name: str, since: float, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        return next((e for e in self.events if e["event"] == name and e["time"] >= since and match(e)), None)

    def step_at(self, t: float) -> int:
        """The last step metrics.jsonl had logged at unix time ``t`` (0 before the first)."""
        i = bisect.bisect_right(self.times, t)
        return self.steps[i - 1] if i else 0

    def stop(self, grace: float = 120.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            self.exit_code = None if proc is None else proc.returncode
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            self.exit_code = proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            print(f"training did not exit {grace:.0f} s after SIGTERM; killing its process group", file=sys.stderr)
        except ProcessLookupError:
            pass
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group (nothing after a clean exit)
            if proc.poll() is None:
                proc.wait()
            if self.exit_code is None:
                self.exit_code = proc.returncode


def file_trial(run: Run, trigger: Path, timeout: float) -> dict[str, Any]:
    run.wait_for("deletion of the previous trigger file", lambda: None if trigger.exists() else True, timeout)
    touched = time.time()
    trigger.touch()
    done = run.wait_for(
        "SaveCompleted for the trigger file",
        lambda: run.event("SaveCompleted", touched, lambda e: "file" in e["reasons"]),
        timeout,
    )
    seen = run.event("SaveRequested", touched, lambda e: e["reason"] == "file")
    step0 = run.step_at(touched)
    return {
        "seconds": done["time"] - touched,
        "steps": done["step"] - step0,
        "step_at_trigger": step0,
        "saved_step": done["step"],
        "seen_seconds": None if seen is None else seen["requested_at"] - touched,
        "save_seconds": done["seconds"],
        "kind": done["kind"],
        "time": touched,
    }


def request_trial(run: Run, kind: str, timeout: float) -> dict[str, Any]:
    cmd = [tool("ckptbus"), "request", "--output-dir", str(run.output_dir), "--kind", kind, "--json"]
    cmd += ["--timeout", str(timeout)]
    started = time.time()
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}: {out.stdout.strip()} {out.stderr.strip()}")
    reply = json.loads(out.stdout)
    rid = reply["request_id"]
    done = run.wait_for(
        f"SaveCompleted for {rid}", lambda: run.event("SaveCompleted", started, lambda e: rid in e["request_ids"]), 30
    )
    arrived = run.event("SaveRequested", started, lambda e: e["request_id"] == rid)
    step0 = run.step_at(started)
    return {
        "seconds": wall,
        "steps": int(reply["step"]) - step0,
        "step_at_request": step0,
        "saved_step": int(reply["step"]),
        "arrived_seconds": None if arrived is None else arrived["requested_at"] - started,
        "steps_after_arrival": None if arrived is None else int(reply["step"]) - run.step_at(arrived["requested_at"]),
        "committed_seconds": done["time"] - started,
        "save_seconds": done["seconds"],
        "kind": reply["kind"],
        "path": reply["path"],
        "time": started,
    }


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary(values: list[float], digits: int = 4) -> dict[str, Any]:
    return {
        "samples": [round(v, digits) for v in values],
        "median": round(statistics.median(values), digits),
        "p95": round(percentile(values, 95), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "mean": round(statistics.fmean(values), digits),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = result["kinds"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, data in kinds.items():
        xs = sorted(data["seconds"]["samples"])
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        left.step(xs, ys, where="post", label=f"{name} (median {data['seconds']['median']:.3f} s)")
    for (name, data), style in zip(result["cli"].items(), (":", "--"), strict=False):
        left.axvline(data["median"], color="grey", linestyle=style, label=f"{name} ({data['median']:.3f} s median)")
    left.set_xlabel("seconds: touch -> committed; CLI start -> CLI exit")
    left.set_ylabel("fraction of trials")
    left.set_title("latency, seconds (CDF)")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    top = max(max(d["steps"]["samples"]) for d in kinds.values())
    width = 0.8 / len(kinds)
    for i, (name, data) in enumerate(kinds.items()):
        counts = [data["steps"]["samples"].count(s) for s in range(top + 1)]
        right.bar([s - 0.4 + width * (i + 0.5) for s in range(top + 1)], counts, width=width, label=name)
    right.axvline(result["check_interval"], color="grey", linestyle=":", label="check_interval")
    right.set_xlabel("optimizer steps: saved step - last logged step at the trigger")
    right.set_ylabel("trials")
    right.set_title(f"latency, steps (step {result['step_seconds']['median'] * 1000:.1f} ms median)")
    right.legend(fontsize=8)
    right.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="trials per kind")
    parser.add_argument("--check-interval", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="seeds the pauses and the order of the kinds")
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--no-weights", action="store_true", help="skip the 'ckptbus request --kind weights' trials")
    parser.add_argument("--budget", type=float, default=300.0, help="start no new round after this many seconds")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one trial may take")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (config, run, log)")
    parser.add_argument("--pause", type=float, nargs=2, default=(0.5, 2.0), help="seconds before a trial: from, to")
    parser.add_argument("--out", help="the JSON result (default benchmarks/results/latency.json)")
    add_smoke_option(parser)
    args = parser.parse_args()
    if args.smoke:
        args.trials, args.pause = 1, (0.1, 0.3)
    args.out = args.out or default_out("latency", args.smoke)

    rng = random.Random(args.seed)
    kinds = ["file", "request full"] + ([] if args.no_weights else ["request weights"])
    tmp = Path(tempfile.mkdtemp(prefix="ckptbus-latency-"))
    output_dir = tmp / "run"
    config = {
        "output_dir": str(output_dir),
        "max_steps": 10_000_000,
        "seed": 42,
        "learning_rate": 0.001,
        "micro_batch_size": 8,
        "sequence_len": 32,
        "dataset_size": 1024,
        "model": {"n_layer": args.n_layer, "n_head": 2, "n_embd": args.n_embd, "vocab_size": 64},
        "save_total_limit": 2,
        "rotate_on_demand": True,
        "dynamic_checkpoint": {"enabled": True, "check_interval": args.check_interval},
    }
    config_path = tmp / "latency.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    launch = [tool("accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
              str(free_port()), str(REPO / "train.py"), "--config", str(config_path)]  # fmt: skip
    run = Run(launch, output_dir, tmp / "train.log")
    trials: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    cli_cmds = {
        "ckptbus --help": [tool("ckptbus"), "--help"],
        "ckptbus status": [tool("ckptbus"), "status", "--output-dir", str(output_dir)],
    }
    cli_startup: dict[str, list[float]] = {name: [] for name in cli_cmds}
    load_start = os.getloadavg()
    began = time.monotonic()
    try:
        run.start()
        run.wait_for("first step in metrics.jsonl", lambda: run.steps or None, timeout=300, interval=0.1)
        ready = time.monotonic()
        print(f"training started after {ready - began:.1f} s; {args.trials} trials of {', '.join(kinds)}", flush=True)
        for round_no in range(args.trials):
            if time.monotonic() - ready > args.budget:
                print(f"budget of {args.budget:.0f} s spent after {round_no} rounds; stopping early", flush=True)
                break
            for name, cmd in cli_cmds.items():
                t0 = time.perf_counter()
                subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
                cli_startup[name].append(time.perf_counter() - t0)
            for kind in rng.sample(kinds, len(kinds)):
                time.sleep(rng.uniform(*args.pause))
                if kind == "file":
                    trial = file_trial(run, output_dir / TRIGGER, args.timeout)
                else:
                    trial = request_trial(run, kind.split()[1], args.timeout)
                trials[kind].append(trial)
                print(f"  {round_no + 1:3d} {kind:16s} {trial['seconds']:6.3f} s {trial['steps']:3d} steps", flush=True)
        run.poll()
    finally:
        run.stop()
        stopped = [line for line in run.log_tail(200).splitlines() if "stopped by a signal" in line]
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - began

    # Step time over the whole run (saves included), and the median step (no save in it).
    intervals = [b - a for a, b in zip(run.times, run.times[1:], strict=False)]
    span = run.times[-1] - run.times[0]
    result: dict[str, Any] = {
        "what": "on-demand checkpoint latency against a running train.py: seconds and optimizer steps",
        "command": " ".join(["python", "-m", "benchmarks.latency", *sys.argv[1:]]),
        "launch": " ".join(launch),
        "config": config,
        "check_interval": args.check_interval,
        "seed": args.seed,
        "step_seconds": {
            "mean": round(span / (run.steps[-1] - run.steps[0]), 5),
            "median": round(statistics.median(intervals), 5),
            "steps": run.steps[-1],
        },
        "cli": {name: summary(v) for name, v in cli_startup.items()},
        "kinds": {},
        "definitions": {
            "file": "seconds: touch -> SaveCompleted event time (checkpoint and manifest committed); "
            "steps: saved step - last step in metrics.jsonl at the touch",
            "request full/weights": "seconds: wall time of the whole 'ckptbus request --json' process "
            "(start-up included); steps: saved step - last step in metrics.jsonl when the CLI was started",
        },
        "run_seconds": round(elapsed, 1),
        "launcher_exit_code": run.exit_code,
        "ranks_stop_log": [line.split(" INFO ", 1)[-1] for line in stopped],
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
    }
    for kind, done in trials.items():
        if not done:
            continue
        entry: dict[str, Any] = {
            "trials": len(done),
            "seconds": summary([t["seconds"] for t in done]),
            "steps": summary([t["steps"] for t in done], digits=2),
            "save_seconds": summary([t["save_seconds"] for t in done]),
        }
        for extra in ("seen_seconds", "arrived_seconds", "committed_seconds", "steps_after_arrival"):
            values = [t[extra] for t in done if t.get(extra) is not None]
            if values:
                entry[extra] = summary(values)
        entry["saved_kinds"] = sorted({t["kind"] for t in done})
        entry["samples"] = [{k: round(v, 4) if isinstance(v, float) else v for k, v in t.items()} for t in done]
        result["kinds"][kind] = entry
    # Every kind asked for has its figures (a budget spent before a kind's first trial is a malformed result).
    required = [f"kinds.{kind}.{figure}.median" for kind in kinds for figure in ("seconds", "steps", "save_seconds")]
    required += ["step_seconds.median", *(f"cli.{name}.median" for name in cli_cmds)]
    out = write_result(args.out, result, required)
    plot(result, out.with_suffix(".png"))

    step = result["step_seconds"]
    cli = ", ".join(f"{name} median {data['median']:.3f} s" for name, data in result["cli"].items())
    print(f"step: mean {step['mean'] * 1000:.1f} ms, median {step['median'] * 1000:.1f} ms; "
          f"check_interval {args.check_interval}; {cli}")  # fmt: skip
    for kind, entry in result["kinds"].items():
        s, n = entry["seconds"], entry["steps"]
        print(f"{kind:16s} seconds median {s['median']:.3f} p95 {s['p95']:.3f} (min {s['min']:.3f} max {s['max']:.3f})"
              f"   steps median {n['median']:g} p95 {n['p95']:g} (min {n['min']:g} max {n['max']:g})")  # fmt: skip
    print(f"run {elapsed:.0f} s, launcher exit status {run.exit_code}; written to {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
