"""The interface every trigger source implements."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

logger = logging.getLogger("ckptbus")


@runtime_checkable
class TriggerSource(Protocol):
    """Something that publishes ``save_requested`` on a bus.

    ``start`` runs once on the training thread before the first step;
    ``poll`` runs on the training thread at every optimizer-step boundary,
    before the ranks vote (a source that only reacts to threads or signals
    may do nothing there); ``close`` undoes ``start`` and must be safe to call
    twice. None of them may call a collective or save anything.
    """

    def start(self) -> None: ...

    def poll(self, step: int) -> None: ...

    def close(self) -> None: ...


def close_all(sources: Iterable[TriggerSource]) -> None:
    """Close ``sources`` in reverse order; one that raises is logged and does not keep the others open."""
    for source in reversed(list(sources)):
        try:
            source.close()
        except Exception:
            logger.exception("ckptbus: closing %r failed", source)
