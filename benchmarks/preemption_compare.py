"""The same preemption under transformers' JIT checkpoint and under ckptbus, side by side.

    python -m benchmarks.preemption_compare [--trials 5] [--out benchmarks/results/preemption_compare.json] [--smoke]

Each trial starts ``transformers.Trainer`` on 2 CPU ranks with
``accelerate launch`` (benchmarks/preemption_worker.py), waits until it has
trained a few steps (more in each trial, and a fraction of a second later
each time, so the signal lands at varied points of a step), then sends
SIGTERM to the launcher's process group, as a scheduler or the kubelet
does; the launcher forwards it to the ranks. Arms:

- ``jit``: ``TrainingArguments(enable_jit_checkpoint=True)`` (transformers
  5.24 and 5.25 have it): each rank starts a 3 s timer, then saves ``checkpoint-<step>``
  where it is, on its own;
- ``ckptbus``: the ckptbus callback: the ranks agree on a step and save a
  full checkpoint with its manifest.

Per trial: whether a complete checkpoint is on disk (jit: no
``checkpoint-is-incomplete.txt``, the model, optimizer, scheduler, trainer
state and both ranks' RNG states; ckptbus: ``ckptbus list``'s complete full
checkpoint), whether resuming from it (a plain Trainer, a few steps) gives
parameters bit-identical, step by step, to an uninterrupted reference run,
whether the launcher hung (not gone ``--hang-after`` seconds after the
signal; then it is killed), and the seconds from the signal to the
launcher's exit. The jit arm needs a transformers with
``enable_jit_checkpoint`` (5.24, as pinned, and 5.25, the newest, have it);
with an older one it is reported unavailable. ``--smoke``: one trial per arm, two resumed steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.output import add_smoke_option, default_out, write_result
from testkit.procs import descendants, free_port, wait_for

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
JIT_SENTINEL = "checkpoint-is-incomplete.txt"
TRAINER_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")


def command(
    arm: str, out: Path, hashes: Path, *, max_steps: int | None = None, resume: Path | None = None
) -> list[str]:
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), "-m", "benchmarks.preemption_worker",
           "--arm", arm, "--out", str(out), "--hashes", str(hashes)]  # fmt: skip
    if max_steps is not None:
        cmd += ["--max-steps", str(max_steps)]
    if resume is not None:
        cmd += ["--resume", str(resume)]
    return cmd


def environment() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_DISABLE_RICH": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def read_hashes(path: Path) -> dict[int, str]:
    if not path.exists():
        return {}
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError, KeyError):
            record = json.loads(line)
            found[int(record["step"])] = str(record["sha256"])
    return found


def run_to_end(cmd: list[str], log: Path, timeout: float) -> int:
    with log.open("ab") as fh:
        return subprocess.run(cmd, cwd=REPO, env=environment(), stdout=fh, stderr=subprocess.STDOUT,
                              timeout=timeout, check=False).returncode  # fmt: skip


def complete_checkpoint(arm: str, out: Path) -> tuple[Path, int] | None:
    """The newest complete checkpoint of the trial, with its step, or None."""
    if arm == "ckptbus":
        from ckptbus import list_checkpoints

        full = [info for info in list_checkpoints(out) if info.manifest.kind == "full"]
        return (full[-1].path, full[-1].step) if full else None
    found = []
    for folder in out.glob("checkpoint-*"):
        names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
        if JIT_SENTINEL in names or not set(TRAINER_FILES) <= names:
            continue
        if not {f"rng_state_{rank}.pth" for rank in (0, 1)} <= names:
            continue
        found.append((folder, int(folder.name.split("-")[1])))
    return max(found, key=lambda item: item[1]) if found else None


def trial(arm: str, index: int, work: Path, *, hang_after: float, resume_steps: int) -> dict[str, Any]:
    out = work / f"{arm}-{index}"
    out.mkdir(parents=True)
    hashes, log = out / "hashes.jsonl", out / "run.log"
    after_step, offset = 8 + 5 * index, 0.13 * index  # varied moments: later steps, another phase of a step
    with log.open("wb") as fh:
        proc = subprocess.Popen(command(arm, out, hashes), cwd=REPO, env=environment(), stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    ranks: list[int] = []
    try:
        wait_for(lambda: max(read_hashes(hashes), default=0) >= after_step, f"{arm} to train", 600)
        ranks = descendants(proc.pid)
        time.sleep(offset)  # where in a step the signal lands (the moment is the variable here, not a wait)
        signalled_at = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            status: int | None = proc.wait(timeout=hang_after)
            exit_seconds: float | None = time.monotonic() - signalled_at
        except subprocess.TimeoutExpired:
            status, exit_seconds = None, None
    finally:
        for pid in [proc.pid, *ranks]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    signalled_step = max(read_hashes(hashes), default=0)
    result: dict[str, Any] = {
        "arm": arm,
        "trial": index,
        "signal_after_step": after_step,
        "last_step_trained": signalled_step,
        "hang": status is None,
        "launcher_status": status,
        "exit_seconds": round(exit_seconds, 2) if exit_seconds is not None else None,
        "incomplete_folders": sorted(p.parent.name for p in out.glob(f"checkpoint-*/{JIT_SENTINEL}")),
    }
    found = complete_checkpoint(arm, out)
    result["complete_checkpoint"] = found[1] if found else None
    result["resumed_hashes"] = None
    if found is not None:
        path, step = found
        resumed = out / "resumed.jsonl"
        code = run_to_end(command("plain", out / "resumed", resumed, max_steps=step + resume_steps, resume=path),
                          out / "resume.log", 600)  # fmt: skip
        result["resume_status"] = code
        result["resumed_hashes"] = {str(s): h for s, h in read_hashes(resumed).items()}
    return result


def trained_steps(work: Path) -> tuple[dict[int, str], int]:
    """The parameters after each step that the uninterrupted parts of the trials trained (every arm trains the same
    steps alike, a constant rate and the same data), and at how many steps two runs disagreed (should be 0)."""
    seen: dict[int, str] = {}
    disagreements = 0
    for path in sorted(work.glob("*/hashes.jsonl")):
        for step, digest in read_hashes(path).items():
            disagreements += seen.setdefault(step, digest) != digest
    return seen, disagreements


def judge(trials: list[dict[str, Any]], reference: dict[int, str], resume_steps: int) -> None:
    """Mark each trial bit-exact when every resumed step's parameters equal the reference's at that step."""
    for t in trials:
        resumed = t.pop("resumed_hashes")
        step = t["complete_checkpoint"]
        if step is None or not resumed:
            t["bit_exact"] = False
            continue
        wanted = range(step + 1, step + resume_steps + 1)
        t["bit_exact"] = all(resumed.get(str(s)) == reference.get(s) is not None for s in wanted)


def summary(trials: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arm in sorted({t["arm"] for t in trials}):
        mine = [t for t in trials if t["arm"] == arm]
        times = [t["exit_seconds"] for t in mine if t["exit_seconds"] is not None]
        out[arm] = {
            "trials": len(mine),
            "complete_checkpoint": sum(t["complete_checkpoint"] is not None for t in mine),
            "resumable_bit_exact": sum(t["bit_exact"] for t in mine),
            "hang": sum(t["hang"] for t in mine),
            "exit_seconds_median": round(statistics.median(times), 2) if times else None,
            "exit_seconds_max": round(max(times), 2) if times else None,
        }
    return out


def jit_available() -> tuple[bool, str]:
    import transformers
    from transformers import TrainingArguments

    fields = getattr(TrainingArguments, "__dataclass_fields__", {})
    return "enable_jit_checkpoint" in fields, transformers.__version__


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5, help="trials per arm")
    parser.add_argument("--resume-steps", type=int, default=5, help="steps trained after resuming, compared")
    parser.add_argument("--hang-after", type=float, default=90.0, help="seconds after the signal that count as a hang")
    parser.add_argument("--work", default="/tmp/ckptbus-preemption", help="where the runs write (emptied first)")
    parser.add_argument("--out", help="the JSON result (default benchmarks/results/preemption_compare.json)")
    add_smoke_option(parser)
    args = parser.parse_args()
    if args.smoke:
        args.trials, args.resume_steps = 1, 2
    args.out = args.out or default_out("preemption_compare", args.smoke)
    work = Path(args.work)
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)

    import accelerate

    has_jit, transformers_version = jit_available()
    arms = ["jit", "ckptbus"] if has_jit else ["ckptbus"]
    trials = [
        trial(arm, i, work, hang_after=args.hang_after, resume_steps=args.resume_steps)
        for i in range(args.trials)
        for arm in arms
    ]
    reference, disagreements = trained_steps(work)
    needed = max([t["complete_checkpoint"] or 0 for t in trials], default=0) + args.resume_steps
    if any(step not in reference for step in range(1, needed + 1)):  # else the trials' own steps are the reference
        reference_hashes = work / "reference.jsonl"
        run_to_end(
            command("plain", work / "reference", reference_hashes, max_steps=needed), work / "reference.log", 900
        )
        reference.update(read_hashes(reference_hashes))
    judge(trials, reference, args.resume_steps)
    result = {
        "what": "SIGTERM to the launcher's process group, 2 CPU ranks, transformers.Trainer",
        "versions": {"transformers": transformers_version, "accelerate": accelerate.__version__},
        "jit": "measured"
        if has_jit
        else f"unavailable: transformers {transformers_version} has no enable_jit_checkpoint",
        "trials_per_arm": args.trials,
        "resume_steps": args.resume_steps,
        "hang_after_seconds": args.hang_after,
        "runs_disagreeing_before_the_signal": disagreements,
        "summary": summary(trials),
        "trials": trials,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    write_result(args.out, result, [("summary", "ckptbus", "trials")])
    print("| arm | trials | complete checkpoint | resumable bit-exact | hang | exit after SIGTERM (median, max) |")
    print("|---|---|---|---|---|---|")
    for arm, s in result["summary"].items():
        times = f"{s['exit_seconds_median']} s, {s['exit_seconds_max']} s" if s["exit_seconds_median"] else "-"
        row = [arm, s["trials"], s["complete_checkpoint"], s["resumable_bit_exact"], s["hang"], times]
        print("| " + " | ".join(str(x) for x in row) + " |")
    print(f"versions: {result['versions']}; jit: {result['jit']}; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
