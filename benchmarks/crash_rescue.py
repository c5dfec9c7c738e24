"""A rank dies: how long until the survivors' checkpoint is committed, and what the copy that makes it costs per step.

From the repository root (it starts its own 2-rank runs over gloo, each on a free port):

    python -m benchmarks.crash_rescue [--trials 3] [--smoke]

Two measurements, side by side in one run, on the GPT-2 of
benchmarks/save_stall.py (about 42M parameters with AdamW's state: about
513 MB):

1. **Crash to commit.** train.py runs on 2 ranks with ckptbus's defaults
   (``on_error: full``); at the forward pass of step ``--fail-step`` rank 1
   writes ``time.time()`` to a file and dies (benchmarks/crash_rescue_dying.py):
   ``kill`` (SIGKILL to itself, as the OOM killer sends it) and ``raise``
   (``RuntimeError``, as an out-of-memory error raises), alternating, each
   ``--trials`` times. The figure is the time from that stamp to the rescued
   checkpoint's ``SaveCompleted`` in the event log (``ckptbus-events.jsonl``,
   microsecond resolution; the manifest's ``created`` has seconds only), and
   the steps lost: the last step every rank completed (``--fail-step`` - 1)
   minus the rescued step (0 expected). torchrun SIGTERMs the survivors once
   it sees a rank fail, never before it fails, and SIGKILLs them 30 s later:
   crash to commit under 30 s means the rescue fits in that grace
   (``within_torchrun_grace``).
2. **The per-step copy.** The same model under ``on_error: full`` and
   ``on_error: none`` (which skips the copy), in alternating blocks of one
   launched run (benchmarks/crash_rescue_copy.py): the time of every
   ``ckpt.step()`` of each arm, and of the copy alone
   (``AccelerateSink.rank_state()`` + ``RankMirror.record()``, in a tight
   loop and right after each training step), in microseconds and as a share
   of the training step. Target: not
   measurable next to the step.

Results go to benchmarks/results/crash_rescue.json.

``--smoke``: a GPT-2 of one block, one trial of each failure, 2 rounds of
the copy: end to end in a minute or two, the result checked and written to
a temporary directory (benchmarks/output.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.output import SMOKE_RESULTS, add_smoke_option, default_out, write_result
from benchmarks.run_all import REPO, launch

COMMAND = "python -m benchmarks.crash_rescue"
HOWS = ("kill", "raise")
GRACE_SECONDS = 30.0
"""torchrun's time between the SIGTERM it sends the surviving ranks and its SIGKILL."""
REQUIRED = (
    "checkpoint_bytes",
    *(f"crash_to_commit_seconds.{how}.{figure}" for how in HOWS for figure in ("median", "max")),
    *(f"steps_lost_max.{how}" for how in HOWS),
    "within_torchrun_grace",
    "copy.median_step_seconds",
    "copy.copy_microseconds.both",
    "copy.copy_over_step",
    "copy.copy_at_boundary_microseconds",
    "copy.step_call_microseconds.on_error full",
    "copy.step_call_microseconds.on_error none",
    "copy.step_call_full_minus_none_microseconds",
    "copy.step_call_full_minus_none_over_step",
)


def train_config(output_dir: Path, n_layer: int, n_embd: int) -> dict[str, Any]:
    """train.py's config: the benchmark's GPT-2, ckptbus on with its defaults (``on_error: full``), no schedule."""
    return {
        "output_dir": str(output_dir),
        "max_steps": 100_000,
        "seed": 0,
        "micro_batch_size": 1,
        "sequence_len": 16,
        "dataset_size": 64,
        "model": {"n_layer": n_layer, "n_head": 12, "n_embd": n_embd, "vocab_size": 256},
        "dynamic_checkpoint": {"enabled": True},
    }


def run(command: list[str], log: Path, timeout: float) -> tuple[int, float]:
    """Run ``command`` from the repository root, its output into ``log``; (exit status, time.time() at its end).
    Killed with its whole process group past ``timeout`` seconds."""
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise SystemExit(f"{' '.join(command)} ran past {timeout:.0f} s; its output is in {log}") from None
    return code, time.time()


def tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def trial(workdir: Path, how: str, args: argparse.Namespace) -> dict[str, Any]:
    """One run of train.py whose rank 1 fails by ``how``: when it failed, when the rescue was committed, what."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    output_dir, died_at, config = workdir / "out", workdir / "died_at", workdir / "config.yaml"
    config.write_text(json.dumps(train_config(output_dir, args.n_layer, args.n_embd)), encoding="utf-8")
    spec = f"1:{args.fail_step}:{how}"
    command = [*launch("crash_rescue_dying"), "--fail", spec, "--died-at", str(died_at), "--config", str(config)]
    log = workdir / "launch.log"
    code, ended = run(command, log, args.timeout)
    if code == 0 or not died_at.exists():
        raise SystemExit(f"--fail {spec}: the run exited {code} without rank 1 failing:\n{tail(log)}")
    died = float(died_at.read_text(encoding="utf-8"))
    log_file = output_dir / "ckptbus-events.jsonl"
    lines = log_file.read_text(encoding="utf-8").splitlines() if log_file.exists() else []
    events = [json.loads(line) for line in lines if line]
    committed = [e for e in events if e["event"] == "SaveCompleted" and e.get("reasons") == ["rank_failure"]]
    checkpoints = sorted(output_dir.glob("checkpoint-*"))
    if len(committed) != 1 or len(checkpoints) != 1:
        raise SystemExit(f"--fail {spec}: want one rescued checkpoint, got {checkpoints} and {committed}:\n{tail(log)}")
    manifest = json.loads((checkpoints[0] / "ckptbus.json").read_text(encoding="utf-8"))
    last_completed = args.fail_step - 1
    result = {
        "how": how,
        "exit_code": code,
        "crash_to_commit_seconds": committed[0]["time"] - died,
        "crash_to_launcher_exit_seconds": ended - died,
        "rescued_step": manifest["step"],
        "steps_lost": last_completed - manifest["step"],
        "written_by": manifest["failure"]["written_by"],
        "exact": manifest["failure"]["exact"],
        "checkpoint_bytes": manifest["bytes"],
        "write_seconds": manifest["write_seconds"],
    }
    shutil.copyfile(log, workdir.with_name(workdir.name + ".log"))  # (kept beside: what the ranks said)
    shutil.rmtree(workdir, ignore_errors=True)  # (half a gigabyte per trial)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=3, help="runs of each failure (kill, raise)")
    parser.add_argument("--fail-step", type=int, default=5, help="rank 1 fails in the forward pass of this step")
    parser.add_argument("--rounds", type=int, default=12, help="rounds of the per-step copy's arms")
    parser.add_argument("--block", type=int, default=3, help="steps per arm per round")
    parser.add_argument("--repeats", type=int, default=2000, help="times the copy alone is timed")
    parser.add_argument("--n-layer", type=int, default=6)
    parser.add_argument("--n-embd", type=int, default=768, help="a multiple of 12 (the heads)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one launch may take")
    parser.add_argument(
        "--dir", help="where the runs go (default outputs/bench-crash-rescue; a temporary one with --smoke)"
    )
    parser.add_argument("--out", help="the JSON result (default benchmarks/results/crash_rescue.json)")
    add_smoke_option(parser)
    args = parser.parse_args()
    if args.smoke:
        args.trials, args.rounds, args.block, args.repeats, args.n_layer, args.n_embd = 1, 2, 2, 20, 1, 48
    args.out = args.out or default_out("crash_rescue", args.smoke)
    if args.dir:
        root = Path(args.dir)
    elif args.smoke:
        SMOKE_RESULTS.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="bench-crash-rescue-", dir=SMOKE_RESULTS))
    else:
        root = REPO / "outputs" / "bench-crash-rescue"
    root.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    trials: list[dict[str, Any]] = []
    for index in range(args.trials):
        for how in HOWS if index % 2 == 0 else HOWS[::-1]:  # (the failure that goes first alternates)
            trials.append(trial(root / f"{how}-{index}", how, args))
            print(json.dumps(trials[-1]), flush=True)

    copy_out = root / "copy.json"
    copy_args = ["--out", str(copy_out), "--rounds", str(args.rounds), "--block", str(args.block)]
    copy_args += ["--repeats", str(args.repeats), "--n-layer", str(args.n_layer), "--n-embd", str(args.n_embd)]
    log = root / "copy.log"
    try:
        code, _ = run([*launch("crash_rescue_copy"), *copy_args], log, args.timeout)
        failure = None if code == 0 else f"benchmarks.crash_rescue_copy exited {code}"
    except SystemExit as exc:  # (the trials' figures are still written; write_result then refuses the result)
        failure = str(exc)
    copy = json.loads(copy_out.read_text(encoding="utf-8")) if failure is None else {"error": f"{failure}\n{tail(log)}"}
    if not args.dir and args.smoke:
        shutil.rmtree(root, ignore_errors=True)

    def of(how: str, key: str) -> list[Any]:
        return [t[key] for t in trials if t["how"] == how]

    crash_to_commit = {
        how: {
            "median": statistics.median(of(how, "crash_to_commit_seconds")),
            "max": max(of(how, "crash_to_commit_seconds")),
        }
        for how in HOWS
    }
    result = {
        "command": COMMAND + (" --smoke" if args.smoke else f" --trials {args.trials}"),
        "world_size": 2,
        "model": {"n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": 12, "vocab_size": 256},
        "fail_step": args.fail_step,
        "checkpoint_bytes": trials[0]["checkpoint_bytes"],
        "crash_to_commit_seconds": crash_to_commit,
        "crash_to_launcher_exit_seconds_median": {
            how: statistics.median(of(how, "crash_to_launcher_exit_seconds")) for how in HOWS
        },
        "write_seconds_median": {how: statistics.median(of(how, "write_seconds")) for how in HOWS},
        "steps_lost_max": {how: max(of(how, "steps_lost")) for how in HOWS},
        "within_torchrun_grace": max(c["max"] for c in crash_to_commit.values()) < GRACE_SECONDS,
        "copy": copy,
        "trials": trials,
        "total_seconds": time.perf_counter() - started,
    }
    write_result(args.out, result, REQUIRED)
    keys = ("checkpoint_bytes", "crash_to_commit_seconds", "steps_lost_max", "within_torchrun_grace", "copy")
    print(json.dumps({k: result[k] for k in keys}, indent=2))


if __name__ == "__main__":
    main()
