"""Run every benchmark; each writes JSON (and a PNG where it plots) under benchmarks/results/.

    python -m benchmarks.run_all            # or: make bench
    python -m benchmarks.run_all --smoke    # each in its smoke mode, results in a temporary directory

From the repository root. Each benchmark measures its arms side by side in
one run and reports ratios, because these machines are shared and noisy.
Options after ``run_all`` (``--smoke``, say) are passed to every benchmark.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from testkit.procs import free_port

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def launch(module: str, processes: int = 2) -> list[str]:
    return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes),
            "--main_process_port", str(free_port()), "-m", f"benchmarks.{module}"]  # fmt: skip


def python(module: str) -> list[str]:
    return [sys.executable, "-m", f"benchmarks.{module}"]


BENCHMARKS: list[tuple[str, list[str]]] = [
    ("per-step overhead (check_interval 100 with the socket; all on, a vote every step)", launch("overhead")),
    ("CLI start-up", python("cli_startup")),
    ("latency: trigger file and ckptbus request", python("latency")),
    ("full save: async stall vs save_state, sync fsync vs dd", launch("save_stall")),
    ("content digests: a synchronous save with and without them", launch("digest_cost")),
    ("scale: save time, stall and bytes by model size and world size", python("scale")),
    ("preemption: SIGTERM under transformers' JIT checkpoint and under ckptbus", python("preemption_compare")),
    ("crash rescue: a rank dies, time to the survivors' checkpoint; the per-step copy", python("crash_rescue")),
    ("object storage: a checkpoint's upload, ckptbus against plain boto3", python("remote_upload")),
    ("object storage: training throughput while uploading against none", launch("remote_training")),
]


def main() -> int:
    failed = 0
    for title, cmd in BENCHMARKS:
        cmd = [*cmd, *sys.argv[1:]]
        print(f"== {title}\n$ {' '.join(cmd)}", flush=True)
        failed += subprocess.call(cmd, cwd=REPO) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
