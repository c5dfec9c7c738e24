"""ckptbus's log lines, seen with no logging set-up, once per run, without breaking a progress bar.

Python prints nothing below WARNING until a program configures logging, and
most training scripts never do for a library's logger: ckptbus's INFO lines
(``saved full checkpoint ...``, ``serving checkpoint requests on ...``) would
be lost. So, as accelerate and transformers do for theirs, ckptbus gives its
logger (``"ckptbus"``) a handler of its own:

- it prints only while the root logger has no handler: once a program calls
  ``logging.basicConfig`` (or pytest captures logs), ckptbus's records go
  there instead (they propagate), never twice;
- it writes through ``tqdm.write`` when tqdm is loaded, so a line never
  lands in the middle of a progress bar;
- on every process but the first of each machine (local rank 0) the
  logger's level is WARNING, so an INFO line appears once per machine (once
  per run on one machine, once in each machine's log on several); warnings
  and errors, which are about the rank that logs them, appear from every rank.

``CKPTBUS_LOG_LEVEL`` (``DEBUG``, ``INFO``, ``WARNING``, ``ERROR``) sets the
level on every rank. A level set on the ``"ckptbus"`` logger by the program
itself is left alone. ``TRANSFORMERS_VERBOSITY`` and ``ACCELERATE_LOG_LEVEL``
do not change it: they default to warnings only, and ckptbus's lines are the
ones a person asked for.
"""

from __future__ import annotations

import logging
import os
import sys

LOG_LEVEL_ENV = "CKPTBUS_LOG_LEVEL"
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

logger = logging.getLogger("ckptbus")
_ours: list[int] = []  # the level set_up gave the logger last: a level the program set itself is left alone


class _DefaultHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Standard error, through tqdm when it is loaded; silent once the program configured logging itself."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return  # the program configured logging: the record propagates to its handlers
        tqdm = sys.modules.get("tqdm")
        if tqdm is None:
            super().emit(record)
            return
        try:
            tqdm.tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def set_up(local_rank: int | None = None) -> None:
    """Give the ``ckptbus`` logger its default handler (once) and the level for ``local_rank`` (module docs).

    ``local_rank`` None: taken from the launcher's ``LOCAL_RANK`` variable (0 without one).
    """
    if not any(isinstance(h, _DefaultHandler) for h in logger.handlers):
        logger.addHandler(_DefaultHandler())
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    wanted = os.environ.get(LOG_LEVEL_ENV, "").strip().upper()
    if wanted:
        if wanted not in _LEVELS:
            logger.warning("ckptbus: %s=%r is not one of %s; using INFO", LOG_LEVEL_ENV, wanted, ", ".join(_LEVELS))
            wanted = "INFO"
        logger.setLevel(wanted)
    elif logger.level == logging.NOTSET or (_ours and logger.level == _ours[-1]):
        level = logging.INFO if local_rank == 0 else logging.WARNING
        logger.setLevel(level)
        _ours[:] = [level]
