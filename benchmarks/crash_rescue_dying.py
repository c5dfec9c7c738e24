"""train.py with one rank failing in its forward pass, which writes down the moment it fails (for crash_rescue.py).

    accelerate launch ... -m benchmarks.crash_rescue_dying --fail RANK:STEP:HOW --died-at FILE --config FILE.yaml

At the forward pass of optimizer step STEP (1-based: the last step every
rank completed is STEP - 1), rank RANK writes ``time.time()`` into FILE
(written whole, then renamed into place), then fails by HOW: ``kill``
(SIGKILL to itself, as the kernel's OOM killer sends it) or ``raise``
(``RuntimeError``, as an out-of-memory error raises). The same injection as
tests/scripts/failing_train.py, plus the time stamp the benchmark measures
from. Everything else is train.py itself.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import train


def dying(spec: str, died_at: Path) -> None:
    """Make train.py's model fail as ``spec`` (RANK:STEP:HOW) says, after writing the time into ``died_at``."""
    rank_text, step_text, how = spec.split(":")
    if how not in ("kill", "raise"):
        raise SystemExit(f"crash_rescue_dying: --fail {spec}: HOW must be kill or raise")
    if int(os.environ.get("RANK", "0")) != int(rank_text):
        return
    make_model = train.make_model

    def make_dying_model(cfg: Any) -> Any:
        model = make_model(cfg)
        forward = model.forward
        calls = [0]
        fail_at = (int(step_text) - 1) * cfg.gradient_accumulation_steps + 1

        def forward_that_fails(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == fail_at:
                partial = died_at.with_name(died_at.name + ".partial")
                partial.write_text(repr(time.time()), encoding="utf-8")
                partial.rename(died_at)  # (the reader never sees half a number)
                if how == "raise":
                    raise RuntimeError(f"CUDA out of memory (injected on rank {rank_text} at step {step_text})")
                os.kill(os.getpid(), signal.SIGKILL)
            return forward(*args, **kwargs)

        model.forward = forward_that_fails
        return model

    train.make_model = make_dying_model


def main(argv: list[str]) -> int:
    at, died = argv.index("--fail"), argv.index("--died-at")
    dying(argv[at + 1], Path(argv[died + 1]))
    rest = [a for i, a in enumerate(argv) if i not in {at, at + 1, died, died + 1}]
    return train.main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
