"""A manual check of DeepSpeed and FSDP over NCCL, on a machine with 2 or more GPUs (CI has none).

    python tests/manual/sharded_gpu_check.py                        # every engine
    python tests/manual/sharded_gpu_check.py zero3 fsdp-sharded     # some of them
    python tests/manual/sharded_gpu_check.py --tolerance 0          # demand bit-exact losses and weights

The scenario of the CPU tests (tests/sharded_runs.py), run as a user runs
it: ``accelerate launch --use_deepspeed`` (ZeRO-2, ZeRO-3 with the default
``zero3_save_16bit_model: false``) or ``--use_fsdp --fsdp_version 2``
(sharded and full state dict) of train.py on 2 GPUs, no shim: the trigger
file and ``ckptbus request`` write full checkpoints in the engine's layout;
Ctrl+C writes a weights checkpoint equal to the consolidated full checkpoint
of the same step and loadable with ``from_pretrained``; a resume repeats the
uninterrupted run's losses. GPU kernels (embedding backward, NCCL reductions)
need not be deterministic, so losses and weights are compared with a relative
tolerance (default 1e-4); each engine prints PASS or the failed check.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))

from sharded_runs import ZERO3_GATHERED, Engine, Runs, fsdp, on_demand_then_exact_resume, zero  # noqa: E402

ENGINES = {
    "zero2": lambda: zero(2, on_gpus=True),
    "zero3": lambda: zero(3, on_gpus=True),
    "fsdp-sharded": lambda: fsdp("SHARDED_STATE_DICT", on_gpus=True),
    "fsdp-full": lambda: fsdp("FULL_STATE_DICT", on_gpus=True),
}


def check(engine: Engine, tolerance: float) -> bool:
    """Run the scenario for one engine; its runs' logs and checkpoints are kept when it fails."""
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f"ckptbus-{engine.name}-"))
    runs = Runs(tmp)
    try:
        first, _ = on_demand_then_exact_resume(runs, engine, tmp, tolerance=tolerance)
        if engine.name == "zero3":
            assert ZERO3_GATHERED in first.log(), "the ZeRO-3 Ctrl+C save did not say how it gathered the weights"
    except AssertionError:
        traceback.print_exc()
        print(f"FAIL {engine.name} ({time.monotonic() - started:.0f} s); its runs are in {tmp}")
        return False
    finally:
        runs.close()
    shutil.rmtree(tmp)
    print(f"PASS {engine.name} ({time.monotonic() - started:.0f} s)")
    return True


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("engines", nargs="*", help=f"some of {', '.join(ENGINES)} (default: all)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="relative; 0 demands bit-exact results")
    args = parser.parse_args()
    unknown = [name for name in args.engines if name not in ENGINES]
    if unknown:
        parser.error(f"unknown engine {unknown[0]!r}; choose from {', '.join(ENGINES)}")
    count = torch.cuda.device_count()
    if count < 2:
        print(f"this check needs 2 or more GPUs; torch sees {count}")
        return 2
    print(f"{count} GPUs: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    results = [check(ENGINES[name](), args.tolerance) for name in args.engines or ENGINES]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
