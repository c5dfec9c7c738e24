"""Event payloads published on the bus.

Events are frozen, slotted dataclasses: they cross threads (a socket thread
publishes a request, the training thread completes it) and are handed to user
code, so nobody may change them after they were sent.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

SaveKind = Literal["full", "weights"]
"""``full``: ``accelerator.save_state`` (resumable). ``weights``: ``accelerator.save_model``."""

SAVE_KINDS: tuple[SaveKind, ...] = ("full", "weights")

_request_counter = itertools.count(1)


def new_request_id(reason: str) -> str:
    """A request id unique within this machine: reason, pid and a counter."""
    return f"{reason}-{os.getpid()}-{next(_request_counter)}"


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveRequested:
    """Somebody asked for a checkpoint. Published by trigger sources.

    ``reason`` names the source (``file``, ``schedule``, ``signal``, ``socket``,
    ``api``); ``label`` is free text from the person asking (it is recorded in
    the manifest); ``exit_after`` asks every rank to stop training once the
    checkpoint is written.
    """

    kind: SaveKind = "full"
    reason: str = "api"
    label: str | None = None
    exit_after: bool = False
    request_id: str = ""
    requested_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.kind not in SAVE_KINDS:
            raise ValueError(f"kind must be one of {SAVE_KINDS}, got {self.kind!r}")
        if not self.request_id:
            # Frozen dataclass: the documented way to fill a field after init.
            object.__setattr__(self, "request_id", new_request_id(self.reason))


@dataclass(frozen=True, slots=True, kw_only=True)
class _SaveEvent:
    """What every event about one agreed save says: which step, what kind, why, for whom."""

    step: int
    kind: SaveKind
    reasons: tuple[str, ...]
    """The reasons of every rank (``file``, ``signal``, ``socket``, a source's own, ...)."""
    request_ids: tuple[str, ...]
    labels: tuple[str, ...]
    exit_after: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveStarted(_SaveEvent):
    """Every rank agreed to save at ``step``; writing begins.

    ``request_ids`` are the requests of this rank that the save serves
    (requests made on other ranks are served too, but only their reasons
    travel: see ``reasons``).
    """

    path: str
    """Where the checkpoint will be once complete (it is not there yet)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveCompleted(_SaveEvent):
    """The checkpoint at ``path`` is complete on disk (manifest written, renamed, fsynced).

    ``seconds``: from the agreement to the commit. ``stall_seconds``: how long the save's own work held training
    (the slowest rank; waits for a slower peer are not counted). ``write_seconds``: the time to persist, from the
    start of writing until every file is fsynced.
    Both are those the manifest records (0.0 where a save was answered by a checkpoint already on disk).
    """

    path: str
    bytes: int
    seconds: float
    stall_seconds: float = 0.0
    write_seconds: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveFailed(_SaveEvent):
    """The save at ``step`` failed on at least one rank; nothing was made visible.

    ``error`` says what went wrong (on this rank, or that another rank failed).
    Earlier checkpoints are untouched.
    """

    error: str

    @classmethod
    def unserved(cls, request: SaveRequested, step: int, error: str) -> SaveFailed:
        """The answer to a request that will never be served (training ended first)."""
        return cls(
            step=step,
            kind=request.kind,
            reasons=(request.reason,),
            request_ids=(request.request_id,),
            labels=(request.label,) if request.label else (),
            exit_after=request.exit_after,
            error=error,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiverFailed:
    """A bus receiver raised. Training goes on; this event says who and why."""

    signal: str
    receiver: str
    error: str


Event = SaveRequested | SaveStarted | SaveCompleted | SaveFailed | ReceiverFailed


def event_to_dict(event: Event) -> dict[str, Any]:
    """A JSON-ready dict of ``event`` with its type under ``"event"``."""
    data = asdict(event)
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
    return {"event": type(event).__name__, **data}
