"""Save time, training stall and bytes against model size and world size.

    python -m benchmarks.scale                                       # 10M, 50M, 200M params x 1, 2, 4 ranks
    python -m benchmarks.scale --sizes 10M --worlds 1,2 --rounds 1   # a quick check
    python -m benchmarks.scale --smoke       # one cell, 200K params x 2 ranks, 1 round, in a temporary directory

(from the repository root). For every cell (model size x world size) this starts ``accelerate launch
[--multi_gpu] --num_processes W -m benchmarks.scale_worker ...`` in a session of its own, with a timeout (the
whole group is killed on timeout, or when the machine's available memory falls below ``--min-free-gb``), and
collects one JSON result; the figures are checked at the end (benchmarks/output.py). The worker
(see its docstring) measures, round after round with the first arm rotating: plain ``accelerator.save_state``,
a synchronous ckptbus full save, and an asynchronous one (the time training is held), on a GPT-2 of 16 blocks
whose width sets the size (the number of tensors stays the same, only their size changes).

Before each cell the memory it needs is estimated (per rank: parameters, gradients, AdamW's two moments and,
with several ranks, DDP's gradient buckets, plus a measured base; on the main process also the host snapshot
of an async save); a cell that would not fit in the memory available now (less ``--reserve-gb`` left to other
users) is skipped and recorded as such.

Results: benchmarks/results/scale.json (per cell: medians, samples, MB/s, the ratios async stall / save_state
and sync / save_state; per world size: how seconds grow against bytes between sizes) and scale.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.output import SMOKE_RESULTS, add_smoke_option, default_out, write_result
from testkit.procs import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = REPO / "outputs" / "bench-scale"
VOCAB = 1024
SEQUENCE_LEN = 16  # the worker's sequence_len: the size of GPT-2's position embedding
N_LAYER = 16
# n_embd, n_head; 200K is the smoke run's
SIZES: dict[str, tuple[int, int]] = {"200K": (32, 2), "10M": (224, 7), "50M": (512, 8), "200M": (1024, 16)}
GIB = 2**30
BASE_RANK_BYTES = 0.9 * GIB
"""Peak RSS of one rank beyond the model's tensors: torch, transformers, accelerate, gloo (measured: 0.6 GiB)."""
ARMS = {
    "save_state_s": "save_state",
    "sync_s": "ckptbus sync",
    "async_stall_s": "ckptbus async: training held (main process)",
}
GROWTH_ARMS = ("save_state_s", "sync_s", "sync_write_s", "async_stall_s", "async_write_s")


def parameters(n_embd: int) -> int:
    """GPT-2's parameter count (lm_head tied to the token embedding)."""
    d = n_embd
    return VOCAB * d + SEQUENCE_LEN * d + N_LAYER * (12 * d * d + 13 * d) + 2 * d


def estimate_bytes(params: int, world: int) -> dict[str, float]:
    """Peak memory of a cell: every rank holds params, grads, AdamW's 2 moments (+ DDP buckets when world > 1);
    the main process also the async host snapshot (weights + moments) and, as slack, one more copy of the
    weights for serialization."""
    per_rank = BASE_RANK_BYTES + params * (16 + (4 if world > 1 else 0))
    main_extra = params * (12 + 4)
    return {"per_rank": per_rank, "main_extra": main_extra, "total": world * per_rank + main_extra}


def mem_available() -> float:
    with open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def code_fingerprint() -> dict[str, Any]:
    """What code the workers ran: git HEAD, uncommitted changes and a hash of ckptbus/, plugins/, train.py (other
    people edit them while benchmarks run; a changed hash between cells means the cells ran different code)."""
    files = sorted([*REPO.glob("ckptbus/**/*.py"), *REPO.glob("plugins/*.py"), REPO / "train.py"])
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(REPO).as_posix().encode() + b"\0" + f.read_bytes())

    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {
        "git_head": git("rev-parse", "HEAD"),
        "uncommitted": git("status", "--porcelain", "--", "ckptbus", "plugins", "train.py").splitlines(),
        "sha256": digest.hexdigest()[:16],
    }


def accelerate_bin() -> str:
    here = Path(sys.executable).parent / "accelerate"
    return str(here) if here.exists() else shutil.which("accelerate") or "accelerate"


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the cell's process group (its own session), SIGKILL what is left after 10 s."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_cell(size: str, world: int, args: argparse.Namespace) -> dict[str, Any]:
    n_embd, n_head = SIZES[size]
    work = Path(args.work)
    out = work / f"cell-{size}-w{world}.json"
    log_path = work / "logs" / f"{size}-w{world}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    saves = work / "saves"
    cmd = [accelerate_bin(), "launch", *(["--multi_gpu"] if world > 1 else []), "--num_processes", str(world),
           "--main_process_port", str(free_port()), "-m", "benchmarks.scale_worker",
           "--n-layer", str(N_LAYER), "--n-embd", str(n_embd), "--n-head", str(n_head), "--vocab-size", str(VOCAB),
           "--rounds", str(args.rounds), "--dir", str(saves), "--out", str(out)]  # fmt: skip
    started = time.perf_counter()
    lowest_free = mem_available()
    why: str | None = None
    with open(log_path, "wb") as log, open(log_path, "rb") as tail:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                for line in tail.read().decode(errors="replace").splitlines():
                    if line.startswith("[scale]"):
                        print(f"    {line[8:]}", flush=True)
                lowest_free = min(lowest_free, mem_available())
                if lowest_free < args.min_free_gb * GIB:
                    why = f"killed: available memory fell to {lowest_free / GIB:.1f} GiB (< --min-free-gb)"
                elif time.perf_counter() - started > args.timeout:
                    why = f"killed: timeout after {args.timeout} s"
                if why is not None:
                    kill_group(proc)
                    break
        finally:
            if proc.poll() is None:
                kill_group(proc)
    seconds = time.perf_counter() - started
    shutil.rmtree(saves, ignore_errors=True)
    if why is None and proc.returncode == 0 and out.exists():
        result: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
        result["cell_seconds"] = seconds
        result["lowest_mem_available_bytes"] = lowest_free
        return result
    lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
    return {"failed": why or f"exit status {proc.returncode}", "cell_seconds": seconds, "log_tail": lines}


def summarize(cell: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of one measured cell."""
    med = cell["median"]
    nbytes = med["save_state_bytes"]
    return {
        "bytes": nbytes,
        "ckptbus_bytes": med["sync_bytes"],
        "save_state_s": med["save_state_s"],
        "sync_s": med["sync_s"],
        "sync_write_s": med["sync_write_s"],
        "sync_manifest_stall_s": med["sync_manifest_stall_s"],
        "async_stall_s": med["async_stall_s"],
        "async_held_in_step_s": med["async_held_in_step_s"],
        "async_held_in_optimizer_s": med["async_held_in_optimizer_s"],
        "async_stall_max_ranks_s": med["async_stall_max_ranks_s"],
        "async_manifest_stall_s": med["async_manifest_stall_s"],
        "async_write_s": med["async_write_s"],
        "mb_per_s": {
            "save_state": nbytes / med["save_state_s"] / 1e6,
            "sync": med["sync_bytes"] / med["sync_s"] / 1e6,
            "async_write": med["async_bytes"] / med["async_write_s"] / 1e6,
        },
        "async_stall_over_save_state": med["async_stall_s"] / med["save_state_s"],
        "async_stall_max_ranks_over_save_state": med["async_stall_max_ranks_s"] / med["save_state_s"],
        "sync_over_save_state": med["sync_s"] / med["save_state_s"],
    }


def growth(cells: list[dict[str, Any]], worlds: list[int]) -> dict[str, Any]:
    """Per world size and arm: seconds per GB at each size, and the exponent k of seconds ~ bytes^k between
    consecutive sizes and over all of them (least squares in log-log). k > 1: cost grows faster than bytes."""
    out: dict[str, Any] = {}
    for world in worlds:
        row = sorted((c for c in cells if c["world_size"] == world and "summary" in c), key=lambda c: c["params"])
        if not row:
            continue
        per_world: dict[str, Any] = {}
        for arm in GROWTH_ARMS:
            xs = [c["summary"]["bytes"] for c in row]
            ys = [c["summary"][arm] for c in row]
            entry: dict[str, Any] = {
                "seconds_per_gb": {c["size"]: y / (x / 1e9) for c, x, y in zip(row, xs, ys, strict=True)},
                "exponent_between_sizes": {
                    f"{a['size']}->{b['size']}": math.log(yb / ya) / math.log(xb / xa)
                    for a, b, xa, xb, ya, yb in zip(row, row[1:], xs, xs[1:], ys, ys[1:], strict=False)
                    if ya > 0 and yb > 0
                },
            }
            if len(row) > 1 and all(y > 0 for y in ys):
                entry["exponent_fit"] = fit_slope([math.log(x) for x in xs], [math.log(y) for y in ys])
            entry["faster_than_bytes"] = [k for k, v in entry["exponent_between_sizes"].items() if v > 1.0]
            per_world[arm] = entry
        out[str(world)] = per_world
    return out


def fit_slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def by_world(cells: list[dict[str, Any]], sizes: list[str]) -> dict[str, Any]:
    """Per size and arm: seconds at each world size over seconds with one rank."""
    out: dict[str, Any] = {}
    for size in sizes:
        row = {c["world_size"]: c["summary"] for c in cells if c["size"] == size and "summary" in c}
        if 1 not in row:
            continue
        out[size] = {arm: {str(w): s[arm] / row[1][arm] for w, s in sorted(row.items())} for arm in ARMS}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10M,50M,200M", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--worlds", default="1,2,4", help="comma-separated world sizes")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per cell before its group is killed")
    parser.add_argument("--reserve-gb", type=float, default=3.0, help="memory (GiB) a cell must leave to others")
    parser.add_argument("--min-free-gb", type=float, default=1.5, help="kill a cell if less memory is available")
    parser.add_argument("--work", help=f"cells' results, logs and saves (default {WORK.relative_to(REPO)})")
    parser.add_argument("--out", help="the JSON result (default benchmarks/results/scale.json)")
    add_smoke_option(parser)
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.worlds, args.rounds, args.timeout = "200K", "2", 1, 300.0
    args.work = args.work or str(SMOKE_RESULTS / "bench-scale" if args.smoke else WORK)
    args.out = args.out or default_out("scale", args.smoke)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    worlds = [int(w) for w in args.worlds.split(",") if w.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; known: {list(SIZES)}")

    command = " ".join(["python", "-m", "benchmarks.scale", *sys.argv[1:]])
    print(f"$ {command}")
    for size in sizes:
        n_embd, n_head = SIZES[size]
        print(f"  {size}: GPT-2 n_layer={N_LAYER} n_embd={n_embd} n_head={n_head} vocab={VOCAB}: "
              f"{parameters(n_embd):,} parameters")  # fmt: skip
    Path(args.work).mkdir(parents=True, exist_ok=True)
    code = code_fingerprint()
    print(f"  code: HEAD {code['git_head'][:10]}, uncommitted {code['uncommitted']}, sha256 {code['sha256']}")
    started = time.perf_counter()
    cells: list[dict[str, Any]] = []
    for size in sizes:
        for world in worlds:
            params = parameters(SIZES[size][0])
            est = estimate_bytes(params, world)
            avail = mem_available()
            cell: dict[str, Any] = {"size": size, "params": params, "world_size": world}
            cell["memory_estimate_bytes"] = est
            cell["mem_available_before_bytes"] = avail
            cell["loadavg_before"] = os.getloadavg()  # other users' jobs: the machine is shared
            cell["code_sha256"] = code_fingerprint()["sha256"]
            print(f"== {size} x {world} rank(s): estimated peak {est['total'] / GIB:.1f} GiB "
                  f"({world} x {est['per_rank'] / GIB:.2f} + {est['main_extra'] / GIB:.2f} on the main process), "
                  f"available {avail / GIB:.1f} GiB, load {os.getloadavg()[0]:.1f}  "
                  f"[{time.perf_counter() - started:.0f} s]", flush=True)  # fmt: skip
            if est["total"] > 4 * GIB:
                print(subprocess.run(["free", "-g"], capture_output=True, text=True).stdout, end="", flush=True)
            if est["total"] > avail - args.reserve_gb * GIB:
                cell["skipped"] = (
                    f"estimated peak {est['total'] / GIB:.1f} GiB ({world} ranks x {est['per_rank'] / GIB:.2f} GiB: "
                    f"params + grads + AdamW moments{' + DDP buckets' if world > 1 else ''} = "
                    f"{16 + (4 if world > 1 else 0)} B/param + {BASE_RANK_BYTES / GIB:.1f} GiB base; "
                    f"+ {est['main_extra'] / GIB:.2f} GiB async host snapshot and slack on the main process) "
                    f"> {avail / GIB:.1f} GiB available - {args.reserve_gb:g} GiB reserve"
                )
                print(f"   skipped: {cell['skipped']}", flush=True)
                cells.append(cell)
                continue
            result = run_cell(size, world, args)
            cell.update(result)
            cell["loadavg_after"] = os.getloadavg()
            if "failed" in result:
                print(f"   FAILED ({result['failed']}):\n      " + "\n      ".join(result["log_tail"]), flush=True)
            else:
                cell["summary"] = summarize(result)
                cell["peak_rss_total_bytes"] = sum(result["peak_rss_bytes_per_rank"])
                s = cell["summary"]
                print(f"   {s['bytes'] / 1e6:.0f} MB: save_state {s['save_state_s']:.2f} s, sync {s['sync_s']:.2f} s, "
                      f"async stall {s['async_stall_s']:.2f} s ({s['async_stall_over_save_state']:.2f} of save_state); "
                      f"peak RSS {cell['peak_rss_total_bytes'] / GIB:.1f} GiB (est. {est['total'] / GIB:.1f}); "
                      f"cell {result['cell_seconds']:.0f} s", flush=True)  # fmt: skip
            cells.append(cell)

    total = time.perf_counter() - started
    code_after = code_fingerprint()
    changed = len({code["sha256"], code_after["sha256"], *(c["code_sha256"] for c in cells)}) > 1
    if changed:
        print("WARNING: ckptbus/, plugins/ or train.py changed during the run: cells ran different code", flush=True)
    result = {
        "command": command,
        "code": {"before": code, "after": code_after, "changed_during_run": changed},
        "machine": {"cpus": os.cpu_count(), "mem_total_bytes": _meminfo("MemTotal")},
        "model": {"n_layer": N_LAYER, "vocab": VOCAB, "sequence_len": SEQUENCE_LEN, "sizes": SIZES},
        "rounds": args.rounds,
        "total_seconds": total,
        "cells": cells,
        "growth_by_world_size": growth(cells, worlds),
        "relative_to_one_rank": by_world(cells, sizes),
        "notes": (
            "Medians over the rounds. bytes: files of a plain save_state (ckptbus_bytes adds the manifest). "
            "async_stall_s: the main process's time held over the steps until commit, in ckpt.step() "
            "(async_held_in_step_s) and in optimizer.step() by ckptbus's step pre-hook (async_held_in_optimizer_s); "
            "async_stall_max_ranks_s: the slowest rank's. exponent k: seconds ~ bytes^k (k > 1: faster than bytes)."
        ),
    }
    # Every cell measured (in a smoke run, every cell asked for: none may be skipped) has its figures.
    expected = [c for c in cells if "skipped" not in c or args.smoke]
    required = [
        ("growth_by_world_size", str(c["world_size"]), arm, "seconds_per_gb", c["size"])
        for c in expected
        for arm in GROWTH_ARMS
    ]
    out = write_result(args.out, result, required)
    plot(result, out.with_suffix(".png"))
    print_table(result)
    print(f"total {total:.0f} s; wrote {out} and {out.with_suffix('.png')}")
    return 1 if any("failed" in c for c in cells) else 0


def _meminfo(key: str) -> float:
    with open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return float(line.split()[1]) * 1024
    return 0.0


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{'cell':>10} {'params':>12} {'MB':>7} {'save_state':>10} {'sync':>7} {'write':>7} {'async':>7} "
          f"{'async/ss':>8} {'sync/ss':>8}")  # fmt: skip
    for c in result["cells"]:
        label = f"{c['size']} x{c['world_size']}"
        if "summary" not in c:
            print(f"{label:>10} {c['params']:>12,} {'skipped' if 'skipped' in c else 'FAILED'}")
            continue
        s = c["summary"]
        print(f"{label:>10} {c['params']:>12,} {s['bytes'] / 1e6:>7.0f} {s['save_state_s']:>10.2f} {s['sync_s']:>7.2f} "
              f"{s['sync_write_s']:>7.2f} {s['async_stall_s']:>7.2f} {s['async_stall_over_save_state']:>8.2f} "
              f"{s['sync_over_save_state']:>8.2f}")  # fmt: skip
    for world, arms in result["growth_by_world_size"].items():
        parts = [f"{arm} {', '.join(f'{k} {v:.2f}' for k, v in e['exponent_between_sizes'].items())}"
                 for arm, e in arms.items() if e["exponent_between_sizes"]]  # fmt: skip
        if parts:
            print(f"exponent k (seconds ~ bytes^k), {world} rank(s): " + "; ".join(parts))


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    cells = [c for c in result["cells"] if "summary" in c]
    worlds = sorted({c["world_size"] for c in cells})
    colors = {w: plt.get_cmap("tab10")(i) for i, w in enumerate(worlds)}
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    for ax, (arm, title) in zip(axes.flat, ARMS.items(), strict=False):
        for world in worlds:
            row = sorted((c for c in cells if c["world_size"] == world), key=lambda c: c["params"])
            xs = [c["summary"]["bytes"] / 1e9 for c in row]
            ax.plot(xs, [c["summary"][arm] for c in row], "o-", color=colors[world], label=f"{world} rank(s)")
            if arm == "sync_s":
                ys = [c["summary"]["sync_write_s"] for c in row]
                ax.plot(xs, ys, "x:", color=colors[world], label=f"manifest write_seconds, {world}")
        if cells:  # seconds proportional to bytes, through the smallest save_state of one rank's line
            ref = min(cells, key=lambda c: (c["world_size"], c["params"]))["summary"]
            lo, hi = min(c["summary"]["bytes"] for c in cells), max(c["summary"]["bytes"] for c in cells)
            k = ref[arm] / ref["bytes"]
            ax.plot([lo / 1e9, hi / 1e9], [k * lo, k * hi], "--", color="gray", lw=0.8, label="proportional to bytes")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # labels on decades only: minor ones overlap
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("checkpoint GB")
        ax.set_ylabel("seconds")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes.flat[3]
    for world in worlds:
        row = sorted((c for c in cells if c["world_size"] == world), key=lambda c: c["params"])
        xs = [c["params"] / 1e6 for c in row]
        ax.plot(xs, [c["summary"]["async_stall_over_save_state"] for c in row], "o-", color=colors[world],
                label=f"async stall / save_state, {world}")  # fmt: skip
        ax.plot(xs, [c["summary"]["sync_over_save_state"] for c in row], "s--", color=colors[world],
                label=f"sync / save_state, {world}")  # fmt: skip
    ax.axhline(0.10, color="gray", lw=0.8, ls=":", label="async target 0.10")
    ax.axhline(1.0, color="gray", lw=0.8, ls="-")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("ratio to plain save_state")
    ax.set_title("ratios (median over rounds)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    skipped = [f"{c['size']} x{c['world_size']}" for c in result["cells"] if "summary" not in c]
    fig.suptitle(
        f"full save of GPT-2 + AdamW, by model size and world size (gloo, {result['machine']['cpus']} CPUs)"
        + (f"; not measured: {', '.join(skipped)}" if skipped else ""),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
