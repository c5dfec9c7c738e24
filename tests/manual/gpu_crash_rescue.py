"""A manual check on 2 or more GPUs over NCCL: when a rank dies, do the ranks still alive come back to Python and save?

    python tests/manual/gpu_crash_rescue.py                        # the three ways below, 2 GPUs
    python tests/manual/gpu_crash_rescue.py watcher --processes 4  # one way, 4 GPUs
    python tests/manual/gpu_crash_rescue.py --loss-every 0         # a loop that never waits for the GPU
    python tests/manual/gpu_crash_rescue.py --cpu                  # this script's plumbing, on CPU ranks (gloo)

NOT RUN ON A GPU YET: written where no GPU was lent; it imports, answers
``--help`` and runs with ``--cpu``. Its first GPU run is the measurement
docs/crash.md waits for.

Over gloo (CPU), a survivor waiting in a collective for a dead peer gets an
error as soon as the peer's connections close, and ckptbus's rescue runs
(tests/test_crash_rescue.py). Over NCCL the collective is a kernel that
waits on the GPU for the dead peer's data, and the CPU thread waits for that
kernel (``loss.item()``, a device-to-host copy) or queues more work behind
it: nothing returns to Python, and torchrun SIGKILLs the survivors 30 s after
its SIGTERM. For each way out named on the command line, a hand-written
accelerate loop with ``with DynamicCheckpoint(...)`` (docs/python-api.md,
ckptbus's defaults: ``on_error: full``, votes through shared memory) trains
a GPT-2 (default: the 42M-parameter one of benchmarks/save_stall.py, 513 MB
with AdamW's state) on ``--processes`` GPUs, and rank ``--fail-rank`` SIGKILLs
itself in its forward pass of step ``--fail-step``:

- ``default``: nothing more (``TORCH_NCCL_ASYNC_ERROR_HANDLING`` unset,
  torch's default process-group timeout). Expected: the survivors hang until
  the launcher kills them; nothing is saved.
- ``async-error-handling``: ``TORCH_NCCL_ASYNC_ERROR_HANDLING=2`` (the
  watchdog aborts the communicators of a collective that timed out, and the
  error reaches the training thread) and a process-group timeout of
  ``--pg-timeout`` seconds (10), which has to fit, with the save, inside
  torchrun's 30 s grace.
- ``watcher``: a thread this script starts on every rank polls the ranks'
  shared file (``RankMirror.peers()``, every ``--poll`` seconds): as soon as
  another rank is gone (``alive`` False) or says it stopped training, it
  aborts this rank's NCCL communicators
  (``torch.distributed.distributed_c10d._abort_process_group()``, torch
  2.13; ``ProcessGroup.abort()`` where that is missing). The blocked
  collective then ends, and the exception goes through
  ``DynamicCheckpoint.__exit__`` to the rescue. ``TORCH_NCCL_ASYNC_ERROR_HANDLING=0``
  here, as torch's docstring of that function asks. This lives only in this
  script (a thread it starts; nothing of ckptbus is patched): it is the
  change the product would adopt once it is measured on GPUs.

Reported per way, per surviving rank: whether it came back to Python (and
with which exception, how long after the death), and for the run: whether a
checkpoint was committed, which step, crash to commit (from the dying rank's
``time.time()`` to the event log's ``SaveCompleted``), whether it fits in
torchrun's 30 s. What to expect, reasoned and not yet seen on a GPU: the
CPU runs ahead of the GPU, so by the time a survivor blocks (in
``loss.item()``) it has already queued ``optimizer.step()`` of the step that
died behind the blocked all-reduce, and an abort that ends that kernel lets
the update run on half-reduced gradients. ckptbus's sink notices the
optimizer step (a pre-hook) and refuses to write (the line says "failed
after an optimizer step and before the step boundary"): nothing saved, but
nothing wrong saved. With ``--loss-every 0`` the CPU may instead reach the
step boundary, where the shared-memory vote finds the peer gone and the
rescue saves that step, whose update ran after the abort: the weights check
below is what catches that. Two checks say whether what was saved is whole:

- AdamW's ``step`` counter in the checkpoint's ``optimizer.bin`` equals the
  checkpoint's step (a CPU tensor: counted when ``optimizer.step()`` is
  called, whatever the GPU did).
- The weights equal, within ``--tolerance`` (relative; GPU kernels need not
  be deterministic), those of a reference run without the failure at the
  same step (one more launch, first; ``--no-reference`` skips it). The
  difference to the next step's weights is reported too.

Exit status: 0 when the ``watcher`` way passed every check (or was not
asked), 1 when it did not; ``default`` and ``async-error-handling`` are
reported only. The runs' logs stay in ``--dir`` (a temporary directory by
default, named at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
WAYS = ("default", "async-error-handling", "watcher")
GRACE_SECONDS = 30.0
"""torchrun's time between its SIGTERM to the surviving ranks and its SIGKILL."""
NCCL_ENV = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
ENV = {"default": None, "async-error-handling": "2", "watcher": "0", "reference": None}
"""``TORCH_NCCL_ASYNC_ERROR_HANDLING`` for each way (None: unset, torch's default)."""


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Kill one rank of a 2+ GPU NCCL run mid-training; report whether the surviving ranks came back "
        "to Python and saved, for each way out. NOT RUN ON A GPU YET (see the module docstring).",
    )
    parser.add_argument("ways", nargs="*", help=f"some of {', '.join(WAYS)} (default: all)")
    parser.add_argument("--processes", type=int, default=2, help="ranks, one per GPU (default 2)")
    parser.add_argument("--fail-rank", type=int, default=1, help="the rank that dies (default 1)")
    parser.add_argument(
        "--fail-step", type=int, default=10, help="it dies in the forward pass of this step (default 10)"
    )
    parser.add_argument(
        "--how", choices=("kill", "segv", "raise"), default="kill", help="how it dies (default kill: SIGKILL)"
    )
    parser.add_argument("--pg-timeout", type=float, default=10.0, help="async-error-handling's timeout, seconds")
    parser.add_argument("--poll", type=float, default=0.1, help="the watcher's poll interval, seconds")
    parser.add_argument(
        "--loss-every",
        type=int,
        default=1,
        help="reduce the loss and read it on the CPU (loss.item()) every this many steps, as train.py does at "
        "every step; 0: never, so the CPU runs ahead of the GPU (default 1)",
    )
    parser.add_argument("--n-layer", type=int, default=6)
    parser.add_argument("--n-embd", type=int, default=768, help="a multiple of 12 (the heads)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="relative, for the weights (default 1e-4)")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference run and its weights check")
    parser.add_argument("--wait", type=float, default=120.0, help="seconds a launch may take after the death")
    parser.add_argument("--dir", help="where the runs go (default: a new temporary directory)")
    parser.add_argument("--out", help="the JSON report (default: DIR/report.json)")
    parser.add_argument("--cpu", action="store_true", help="CPU ranks over gloo: checks this script, not NCCL")
    parser.add_argument("--rank-side", help=argparse.SUPPRESS)  # (what each launched rank runs)
    return parser


# -- what each rank runs -------------------------------------------------------------------------------------


def stamp(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` into ``path`` whole (a reader never sees half of it)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record), encoding="utf-8")
    partial.rename(path)


def start_watcher(ckpt: Any, rank: int, poll: float, run_dir: Path) -> threading.Event:
    """The ``watcher`` way: a thread that aborts this rank's communicators once another rank is gone or stopped."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    mirror = ckpt._runtime._mirror  # (the shared file the ranks vote through: plugins/rank_mirror.py)
    if mirror is None:
        raise SystemExit("the ranks share no file (not on one machine, or CKPTBUS_VOTES=collective): no watcher")
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(poll):
            others = [p for p in mirror.peers() if p.rank != rank]
            gone = [p for p in others if not p.alive or p.status != 0]  # (0: RUNNING)
            if not gone:
                continue
            seen = time.time()
            try:
                abort = getattr(distributed_c10d, "_abort_process_group", None)
                if abort is not None:
                    abort()
                else:
                    dist.group.WORLD.abort()  # type: ignore[union-attr]
                error = None
            except Exception as exc:  # (gloo under --cpu has no abort: said in the report)
                error = f"{type(exc).__name__}: {exc}"
            stamp(
                run_dir / f"watcher-{rank}.json",
                {"seen": seen, "aborted": time.time(), "ranks": [p.how() for p in gone], "error": error},
            )
            return

    threading.Thread(target=watch, name="nccl-abort-watcher", daemon=True).start()
    return stop


def rank_side(args: argparse.Namespace) -> int:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed
    from ckptbus.plugins import DynamicCheckpoint, release
    from transformers import GPT2Config, GPT2LMHeadModel

    from ckptbus import CheckpointConfig
    from ckptbus._config import build

    way, run_dir = args.rank_side, Path(args.dir)
    handlers = []
    if way == "async-error-handling":
        backend = "gloo" if args.cpu else "nccl"
        handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timedelta(seconds=args.pg_timeout)))
    accelerator = Accelerator(cpu=args.cpu, kwargs_handlers=handlers)
    rank = accelerator.process_index
    set_seed(0)
    vocab, seq, batch = 256, 64, 4
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=args.n_layer, n_head=12, n_embd=args.n_embd, vocab_size=vocab, n_positions=seq)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    dying = way != "reference" and rank == args.fail_rank
    last = args.fail_step if way == "reference" else 10**6
    block = {"enabled": True, "socket": {"enabled": False}}
    config = build(CheckpointConfig, {"output_dir": str(run_dir / "out"), "dynamic_checkpoint": block})
    back: dict[str, Any] = {"rank": rank, "pid": os.getpid()}
    try:
        with DynamicCheckpoint(accelerator, config) as ckpt:
            stop = start_watcher(ckpt, rank, args.poll, run_dir) if way == "watcher" else None
            try:
                for step in range(1, last + 1):
                    ids = torch.randint(
                        0, vocab, (batch, seq), generator=torch.Generator().manual_seed(step * 1000 + rank)
                    )
                    ids = ids.to(accelerator.device)
                    if dying and step == args.fail_step:
                        stamp(run_dir / "died_at.json", {"time": time.time(), "rank": rank, "how": args.how})
                        if args.how == "raise":
                            raise RuntimeError(f"CUDA out of memory (injected on rank {rank} at step {step})")
                        os.kill(os.getpid(), signal.SIGKILL if args.how == "kill" else signal.SIGSEGV)
                    loss = model(input_ids=ids, labels=ids).loss
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad()
                    if args.loss_every and step % args.loss_every == 0:
                        accelerator.reduce(loss.detach(), "mean").item()
                    if way == "reference" and step >= args.fail_step - 1 and accelerator.is_main_process:
                        state = accelerator.unwrap_model(model).state_dict()
                        torch.save({k: v.detach().cpu() for k, v in state.items()}, run_dir / f"weights-{step}.pt")
                    if ckpt.step(step):
                        break
            except BaseException as exc:
                back.update(back=time.time(), error=(f"{type(exc).__name__}: {exc}".splitlines() or [""])[0])
                stamp(run_dir / f"rank-{rank}.json", back)  # (now: the launcher may SIGKILL it during the rescue)
                raise
            finally:
                if stop is not None:
                    stop.set()
    except BaseException:
        back["after_rescue"] = time.time()  # (DynamicCheckpoint.__exit__ ran the rescue)
        stamp(run_dir / f"rank-{rank}.json", back)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # (tearing NCCL down after a dead peer can hang: not what this checks)
    stamp(run_dir / f"rank-{rank}.json", {**back, "finished": time.time()})
    del model, optimizer
    release(accelerator)
    return 0


# -- the driver ------------------------------------------------------------------------------------------------


def launch(args: argparse.Namespace, way: str, run_dir: Path) -> tuple[int | None, float, Path]:
    """One launch of this script's rank side for ``way``: (exit status or None if killed at --wait, time.time()
    at its end, its log)."""
    from testkit.procs import free_port

    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    env = dict(os.environ)
    env.pop(NCCL_ENV, None)
    if ENV[way] is not None:
        env[NCCL_ENV] = str(ENV[way])
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(args.processes)]
    command += ["--main_process_port", str(free_port()), __file__, "--rank-side", way, "--dir", str(run_dir)]
    for option in ("fail_rank", "fail_step", "how", "pg_timeout", "poll", "loss_every", "n_layer", "n_embd"):
        command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    command += ["--cpu"] if args.cpu else []
    log = run_dir / "launch.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        code: int | None
        cap = time.time() + args.wait + 900.0  # (start-up, and the reference run, which has no death)
        try:
            while proc.poll() is None:  # the death comes after start-up, whose length we cannot know
                died = run_dir / "died_at.json"
                if died.exists() and time.time() - json.loads(died.read_text())["time"] > args.wait:
                    raise subprocess.TimeoutExpired(command, args.wait)
                if time.time() > cap:
                    raise subprocess.TimeoutExpired(command, args.wait + 900.0)
                time.sleep(0.5)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    return code, time.time(), log


def read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def whole(checkpoint: Path, step: int, reference: Path | None, tolerance: float) -> dict[str, Any]:
    """The two checks of what was saved (module docstring)."""
    import torch
    from safetensors.torch import load_file

    optimizer = torch.load(checkpoint / "optimizer.bin", map_location="cpu", weights_only=True)
    counters = {int(s["step"]) for s in optimizer["state"].values() if "step" in s}
    found: dict[str, Any] = {"optimizer_steps": sorted(counters), "optimizer_step_matches": counters == {step}}
    if reference is not None:
        saved = load_file(str(checkpoint / "model.safetensors"))
        for at in (step, step + 1):
            ref_file = reference / f"weights-{at}.pt"
            if not ref_file.exists():
                continue
            ref = torch.load(ref_file, weights_only=True)
            common = [k for k in saved if k in ref]
            worst = max(
                float((saved[k].float() - ref[k].float()).abs().max() / ref[k].float().abs().max().clamp_min(1e-12))
                for k in common
            )
            found[f"weights_relative_difference_to_step_{at}"] = worst
        found["weights_match"] = found.get(f"weights_relative_difference_to_step_{step}", float("inf")) <= tolerance
    return found


def report(args: argparse.Namespace, way: str, run_dir: Path, reference: Path | None) -> dict[str, Any]:
    code, ended, log = launch(args, way, run_dir)
    died = read(run_dir / "died_at.json")
    result: dict[str, Any] = {"way": way, NCCL_ENV: ENV[way], "launcher_exit": code, "log": str(log)}
    if died is None:
        result["problem"] = f"rank {args.fail_rank} never reached step {args.fail_step}; see {log}"
        return result
    result["launcher_exit_after_death_seconds"] = round(ended - died["time"], 3) if code is not None else None
    survivors: dict[str, Any] = {}
    for rank in range(args.processes):
        if rank == args.fail_rank and args.how != "raise":
            continue
        back = read(run_dir / f"rank-{rank}.json")
        watcher = read(run_dir / f"watcher-{rank}.json")
        survivors[str(rank)] = {
            "back_in_python": back is not None and "back" in back,
            "back_after_death_seconds": round(back["back"] - died["time"], 3) if back and "back" in back else None,
            "error": back.get("error") if back else None,
            "watcher": watcher,
        }
    result["ranks"] = survivors
    events_file = run_dir / "out" / "ckptbus-events.jsonl"
    events = [json.loads(line) for line in events_file.read_text().splitlines() if line] if events_file.exists() else []
    committed = [
        e for e in events if e["event"] == "SaveCompleted" and e.get("reasons") in (["rank_failure"], ["error"])
    ]
    checkpoints = sorted((run_dir / "out").glob("checkpoint-*"))
    result["checkpoints"] = [c.name for c in checkpoints]
    result["rescue_lines"] = [
        line for line in log.read_text(errors="replace").splitlines() if "training failed" in line
    ]
    if committed and checkpoints:
        manifest = json.loads((checkpoints[-1] / "ckptbus.json").read_text())
        seconds = committed[-1]["time"] - died["time"]
        result.update(
            rescued_step=manifest["step"],
            steps_lost=args.fail_step - 1 - manifest["step"],
            exact=manifest.get("failure", {}).get("exact"),
            crash_to_commit_seconds=round(seconds, 3),
            within_torchrun_grace=seconds < GRACE_SECONDS,
            **whole(checkpoints[-1], manifest["step"], reference, args.tolerance),
        )
    return result


def passed(result: dict[str, Any]) -> bool:
    return (
        all(r["back_in_python"] for r in result.get("ranks", {}).values())
        and result.get("steps_lost") == 0
        and bool(result.get("within_torchrun_grace"))
        and bool(result.get("optimizer_step_matches"))
        and result.get("weights_match", True) is not False
    )


def main() -> int:
    args = arguments().parse_args()
    if args.rank_side:
        return rank_side(args)
    unknown = [way for way in args.ways if way not in WAYS]
    if unknown:
        arguments().error(f"unknown way {unknown[0]!r}; choose from {', '.join(WAYS)}")
    if args.processes < 2 or not 0 <= args.fail_rank < args.processes or args.fail_step < 2:
        arguments().error("needs --processes >= 2, 0 <= --fail-rank < --processes and --fail-step >= 2")
    import torch

    count = torch.cuda.device_count()
    if not args.cpu and count < args.processes:
        print(f"this check needs {args.processes} GPUs; torch sees {count} (--cpu checks the script on CPU ranks)")
        return 2
    sys.path.insert(0, str(REPO))  # (testkit, for a free port)
    root = Path(args.dir or tempfile.mkdtemp(prefix="ckptbus-gpu-crash-rescue-"))
    device = "CPU ranks over gloo" if args.cpu else f"{count} x {torch.cuda.get_device_name(0)}"
    print(f"{device}; torch {torch.__version__}; runs in {root}", flush=True)
    reference = None
    if not args.no_reference:
        code, _, log = launch(args, "reference", root / "reference")
        if code != 0:
            print(f"the reference run failed (exit {code}); see {log}")
            return 2
        reference = root / "reference"
    results = []
    for way in args.ways or WAYS:
        result = report(args, way, root / way, reference)
        result["passed"] = passed(result)
        results.append(result)
        print(json.dumps(result, indent=2), flush=True)
    out = Path(args.out or root / "report.json")
    out.write_text(json.dumps({"device": device, "torch": torch.__version__, "results": results}, indent=2) + "\n")
    print(f"\n{'way':<22} {'survivors back':<15} {'saved step':<11} {'crash->commit':<14} {'whole':<6} passed")
    for r in results:
        back = sum(s["back_in_python"] for s in r.get("ranks", {}).values())
        commit = f"{r['crash_to_commit_seconds']:.1f} s" if "crash_to_commit_seconds" in r else "-"
        print(
            f"{r['way']:<22} {back}/{len(r.get('ranks', {})):<13} {r.get('rescued_step', '-')!s:<11} {commit:<14} "
            f"{r.get('optimizer_step_matches', '-')!s:<6} {r['passed']}"
        )
    print(f"report: {out}")
    watcher = [r for r in results if r["way"] == "watcher"]
    return 0 if all(r["passed"] for r in watcher) else 1


if __name__ == "__main__":
    sys.exit(main())
