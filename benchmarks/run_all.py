"""Run every benchmark; each writes JSON (and a PNG where it plots) under benchmarks/results/.

    python benchmarks/run_all.py            # or: make bench

Each benchmark measures its arms side by side in one run and reports ratios,
because these machines are shared and noisy.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
# The one free_port (and wait_for) of the tests and benchmarks: tests/procs.py, standard library only.
sys.path.insert(0, str(HERE.parent / "tests"))

from procs import free_port  # noqa: E402


def launch(script: str, processes: int = 2) -> list[str]:
    return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes),
            "--main_process_port", str(free_port()), str(HERE / script)]  # fmt: skip


BENCHMARKS: list[tuple[str, list[str]]] = [
    ("per-step overhead (check_interval 100 with the socket; all on, a vote every step)", launch("overhead.py")),
    ("CLI start-up", [sys.executable, str(HERE / "cli_startup.py")]),
    ("latency: trigger file and ckptbus request", [sys.executable, str(HERE / "latency.py")]),
    ("full save: async stall vs save_state, sync fsync vs dd", launch("save_stall.py")),
    ("content digests: a synchronous save with and without them", launch("digest_cost.py")),
    ("scale: save time, stall and bytes by model size and world size", [sys.executable, str(HERE / "scale.py")]),
]


def main() -> int:
    failed = 0
    for title, cmd in BENCHMARKS:
        if not Path(cmd[-1]).exists():
            print(f"== {title}: {Path(cmd[-1]).name} not present, skipped")
            continue
        print(f"== {title}\n$ {' '.join(cmd)}", flush=True)
        failed += subprocess.call(cmd) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
