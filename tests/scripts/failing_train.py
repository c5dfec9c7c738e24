"""train.py with one failure injected into the model's forward pass, the way real failures arrive.

    accelerate launch ... failing_train.py --fail RANKS:STEP:HOW --config FILE.yaml [train.py options]

At the forward pass of optimizer step STEP (1-based: the last completed step
is STEP - 1), each rank in RANKS (``1``, ``0,2``, or ``all``) fails by HOW:

- ``raise``: ``RuntimeError("CUDA out of memory ...")``, as an OOM raises;
- ``kill``: SIGKILL to itself, as the kernel's OOM killer sends it;
- ``segv``: SIGSEGV to itself, as a crash in native code ends a process.

Everything else is train.py itself (the product's own script, the ``with
DynamicCheckpoint(...)`` form). Started by tests/test_crash_rescue.py.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import train


def failing(spec: str) -> None:
    ranks_text, step_text, how = spec.split(":")
    rank = int(os.environ.get("RANK", "0"))
    if ranks_text != "all" and rank not in {int(r) for r in ranks_text.split(",")}:
        return
    make_model = train.make_model

    def make_failing_model(cfg: Any) -> Any:
        model = make_model(cfg)
        forward = model.forward
        calls = [0]
        fail_at = (int(step_text) - 1) * cfg.gradient_accumulation_steps + 1

        def forward_that_fails(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == fail_at:
                if how == "raise":
                    raise RuntimeError(f"CUDA out of memory (injected on rank {rank} at step {step_text})")
                os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGSEGV)
            return forward(*args, **kwargs)

        model.forward = forward_that_fails
        return model

    train.make_model = make_failing_model


if __name__ == "__main__":
    argv = sys.argv[1:]
    at = argv.index("--fail")
    failing(argv[at + 1])
    sys.exit(train.main(argv[:at] + argv[at + 2 :]))
