"""Start-up mistakes found before torch is imported, reported once per machine, exit status 2.

Under ``accelerate launch`` every rank runs the script: a config typo would be
reported by each of them, seconds later (after torch, the model, the process
group), and a resume path that does not exist only once the model is built
and ckptbus's lock taken. These checks need nothing but the config and the
file system, so a script calls them first (``train.py`` does):

    exit_if_launcher_gone()                       # an orphan saves nothing, joins nothing
    try:
        check_resume_target(config)               # a path that is not a full checkpoint
    except CkptbusError as exc:
        refuse("train.py", exc)                    # one line from the local main process, exit 2

:func:`refuse` prints on the process whose ``LOCAL_RANK`` is 0 (or unset:
``python train.py``) and exits 2 on every rank: once per machine, since a
mistake may be one machine's (a file where output_dir should be on one
node). Nothing here imports torch, and nothing is written: no lock, no
checkpoint, no log. The launcher still reports that its ranks failed
(docs/guide.md#start-up-mistakes says what each launcher prints).
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping
from typing import NoReturn

from ckptbus import CheckpointConfig, CheckpointError
from ckptbus._layout import read_checkpoint
from ckptbus._resume import LATEST, LATEST_OR_FRESH

from ..sources.launcher import exit_if_launcher_gone

__all__ = ["check_resume_target", "exit_if_launcher_gone", "is_local_main", "refuse"]


def is_local_main(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process reports for its machine: ``LOCAL_RANK`` 0, or no launcher's number at all."""
    return environ.get("LOCAL_RANK", "0").strip() in ("0", "")


def refuse(program: str, problem: object, environ: Mapping[str, str] = os.environ) -> NoReturn:
    """Print ``<program>: <problem>`` once per machine (the local main process) and exit with status 2."""
    if is_local_main(environ):
        print(f"{program}: {problem}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def check_resume_target(config: CheckpointConfig) -> None:
    """Refuse a ``resume_from_checkpoint`` path that is not a complete full checkpoint, before anything is loaded.

    ``latest`` and ``latest_or_fresh`` are left to the run (they may mean a
    fresh start). For a path this reads the manifest and checks that every
    listed file is there with its size; the digests are checked when the run
    resumes. Raises :class:`~ckptbus.CheckpointError` naming the path and,
    when it does not exist, the command that lists the checkpoints that do.
    """
    target = config.resume_from_checkpoint
    if target is None or os.fspath(target) in (LATEST, LATEST_OR_FRESH):
        return
    path = os.fspath(target)
    if not os.path.lexists(path):
        listing = f"ckptbus list --output-dir {shlex.quote(os.path.abspath(config.output_dir))}"
        raise CheckpointError(
            f"resume_from_checkpoint {path!r} does not exist ({os.path.abspath(path)}); `{listing}` shows the "
            "complete checkpoints, and resume_from_checkpoint: latest takes the newest"
        )
    info = read_checkpoint(path)
    if info.manifest.kind != "full":
        raise CheckpointError(
            f"resume_from_checkpoint {path!r} is a weights-only checkpoint (no optimizer or RNG state); it cannot "
            "resume training. Pick a full checkpoint (`ckptbus list` shows the kinds)"
        )
