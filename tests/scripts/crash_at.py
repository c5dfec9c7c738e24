"""Run one checkpoint-layout operation and SIGKILL this process at its N-th change to the filesystem.

    python crash_at.py OUTPUT_DIR replace|rotate N

``replace``: commit ``OUTPUT_DIR/.ckptbus-staging-checkpoint-8`` over the
complete ``checkpoint-8`` (a save of a step that already exists). ``rotate``:
``save_total_limit: 1`` rotation of ``OUTPUT_DIR``. The changes counted are
the calls of ``os.rename``, ``os.replace``, ``os.unlink`` and ``os.rmdir``
(``shutil.rmtree`` goes through the last two): before the N-th (from 0), the
process kills itself with SIGKILL, as the kernel would kill it for running
out of memory. Exit status 0 means the operation finished before the N-th
change. The counting wrapper is the only stand-in here: a real SIGKILL from
outside cannot be timed to land between two system calls.
Started by tests/test_faults_rotation.py.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckptbus._layout import checkpoint_path, commit, rotate, staging_path


def kill_at(n: int) -> None:
    calls = [0]

    def counted(real: Callable[..., Any]) -> Callable[..., Any]:
        def change(*args: Any, **kwargs: Any) -> Any:
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            calls[0] += 1
            return real(*args, **kwargs)

        return change

    for name in ("rename", "replace", "unlink", "rmdir"):
        setattr(os, name, counted(getattr(os, name)))


def main() -> None:
    out, operation, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    kill_at(n)
    if operation == "replace":
        fields = {"step": 8, "kind": "full", "reason": "api", "world_size": 1}
        commit(staging_path(out, 8), checkpoint_path(out, 8), fields)
    else:
        rotate(out, 1)


if __name__ == "__main__":
    main()
