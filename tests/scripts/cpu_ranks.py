"""Run a training script under DeepSpeed or FSDP on CPU ranks over gloo (tests only).

    accelerate launch --use_deepspeed --zero_stage 3 --num_processes 2 cpu_ranks.py deepspeed train.py --config X
    accelerate launch --use_fsdp --fsdp_version 2 ... --num_processes 2 cpu_ranks.py fsdp train.py --config X
    accelerate launch ... cpu_ranks.py fsdp -m benchmarks.sharded_save --worker ...   (a module, as python -m)

The script (or module) runs unchanged, as ``__main__``; only the
``Accelerator`` that it imports from accelerate is replaced before it starts:

- ``deepspeed``: what a DeepSpeed run on CPU ranks needs (and GPU ranks do
  not): ``DS_ACCELERATOR=cpu``, ``Accelerator(cpu=False)`` (with ``cpu=True``
  accelerate never takes its DeepSpeed branch) and a gloo process group
  (``InitProcessGroupKwargs(backend="gloo")``; without it accelerate counts
  one process).
- ``fsdp``: the test-only shim of tests/fsdp_cpu_shim.py (accelerate has no
  FSDP on CPU).
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent.parent


def use_deepspeed_on_cpu() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import accelerate
    import deepspeed.ops  # type: ignore[import-untyped]
    from accelerate.utils import InitProcessGroupKwargs

    # At its first init_distributed on CPU, DeepSpeed compiles a C++ shared-memory all-reduce (for CPU inference)
    # into ~/.cache/torch_extensions: 80 s of CPU, 7 minutes on 2 busy cores, and a compile killed midway leaves
    # a lock that every later start waits on forever. ZeRO training over gloo never calls it. (The probe's result
    # is one dict kept by deepspeed.ops, read when the op is looked for.)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    class DeepSpeedOnCpuRanks(accelerate.Accelerator):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["cpu"] = False
            handlers = [*(kwargs.pop("kwargs_handlers", None) or []), InitProcessGroupKwargs(backend="gloo")]
            super().__init__(*args, kwargs_handlers=handlers, **kwargs)

    accelerate.Accelerator = DeepSpeedOnCpuRanks


def use_fsdp_on_cpu() -> None:
    sys.path.insert(0, str(TESTS))
    import fsdp_cpu_shim

    fsdp_cpu_shim.install()


def main() -> None:
    engine, script, *args = sys.argv[1:]
    {"deepspeed": use_deepspeed_on_cpu, "fsdp": use_fsdp_on_cpu}[engine]()
    if script == "-m":
        module, *args = args
        sys.argv = [module, *args]
        sys.path.insert(0, os.getcwd())  # as `python -m module` would
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))  # as `python script` would
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
