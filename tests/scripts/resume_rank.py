"""One rank of a real 2-process gloo run of resume's agreement (started by tests/test_resume_integrity.py).

Usage: RANK=r WORLD_SIZE=2 ... python resume_rank.py OUTPUT_DIR TARGET FAIL_LOAD_RANK RESULT.json

Starts the runtime (the output_dir lock on rank 0), resolves TARGET with
``resolve_resume`` and, if that chose a checkpoint, reports a load outcome:
a failure on rank FAIL_LOAD_RANK (-1: none), as a rank whose
``accelerator.load_state`` failed would. RESULT.json holds what this rank
got from each step, and the ckptbus log lines it wrote itself.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from accelerate import Accelerator
from ckptbus.plugins.distributed import Ranks, TorchExchange
from ckptbus.plugins.runtime import Runtime
from ckptbus.plugins.saving.trainer_sink import TrainerSink

from ckptbus import CheckpointConfig, CheckpointError


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")


def main() -> None:
    out, target, fail_rank, result_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    lines = Lines()
    logger = logging.getLogger("ckptbus")
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    runtime = Runtime(CheckpointConfig(output_dir=out), TrainerSink())  # (a sink that never writes here)
    runtime.start(Ranks.of(TorchExchange(accelerator), rank=rank, local_rank=rank, save_on_each_node=False))
    result: dict[str, Any] = {"rank": rank}
    try:
        info = runtime.resolve_resume(target)
        result["resolved"] = info.step if info is not None else None
        if info is not None:
            error = CheckpointError(f"rank {rank} could not load {info.path}") if rank == fail_rank else None
            runtime.loaded(info, error)
            result["loaded"] = "ok"
    except CheckpointError as exc:
        result["error"] = str(exc)
    finally:
        runtime.shutdown("test ended")
    result["log"] = lines.lines
    with open(result_path, "w", encoding="utf-8") as fh:
        json.dump(result, fh)
    os._exit(0)  # without gloo's teardown at interpreter exit, which can abort a rank whose peer left first


if __name__ == "__main__":
    main()
