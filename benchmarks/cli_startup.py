"""How fast the ``ckptbus`` command starts: it imports no torch, so it answers in a blink.

    python -m benchmarks.cli_startup [--runs 20] [--out benchmarks/results/cli_startup.json] [--smoke]

Each case runs ``--runs`` times in a fresh interpreter (wall time of the
whole process, as a person or a script sees it); the figure is the median.
``python -c pass`` is the floor no command can beat. The JSON records the
machine's load too, since other work on a 2-core machine shows up here.
``--smoke``: one run of each case, the result checked and written to a
temporary directory (benchmarks/output.py).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.output import add_smoke_option, default_out, write_result

BIN = Path(sys.executable).parent


def timed(cmd: list[str], runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        samples.append(time.perf_counter() - started)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", help="the JSON result (default benchmarks/results/cli_startup.json)")
    add_smoke_option(parser)
    args = parser.parse_args()
    if args.smoke:
        args.runs = 1
    args.out = args.out or default_out("cli_startup", args.smoke)

    ckptbus = shutil.which("ckptbus", path=str(BIN)) or "ckptbus"
    empty = tempfile.mkdtemp(prefix="ckptbus-bench-")
    cases = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "import ckptbus.cli": [sys.executable, "-c", "import ckptbus.cli"],
        "ckptbus --help": [ckptbus, "--help"],
        "ckptbus list (empty dir)": [ckptbus, "list", "--output-dir", empty],
        "ckptbus status (no run)": [ckptbus, "status", "--output-dir", empty],
        "import torch (for scale)": [sys.executable, "-c", "import torch"],
    }
    samples = {
        name: timed(cmd, args.runs if "torch" not in name else max(min(3, args.runs), args.runs // 5))
        for name, cmd in cases.items()
    }
    check = subprocess.run(
        [sys.executable, "-c", "import sys, ckptbus.cli; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    os.rmdir(empty)
    result = {
        "what": "wall time of a fresh process, seconds",
        "runs": args.runs,
        "median_seconds": {k: round(statistics.median(v), 4) for k, v in samples.items()},
        "min_seconds": {k: round(min(v), 4) for k, v in samples.items()},
        "torch_loaded": check.stdout.strip() == "True",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    write_result(args.out, result, [(figure, name) for figure in ("median_seconds", "min_seconds") for name in cases])
    for name in cases:
        median, fastest = result["median_seconds"][name], result["min_seconds"][name]
        print(f"{name:28s} median {median * 1000:7.1f} ms   min {fastest * 1000:7.1f} ms")
    print(f"torch loaded by the CLI: {result['torch_loaded']}; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
