"""The contract every sink keeps: how an agreed save is written. The mirror of ``_source.py``.

The runtime owns the step protocol (when to vote, what to save, when to
stop, what to publish); a sink owns only how a checkpoint of one agreed
step gets onto disk. It reports what happened as an :data:`Outcome` and
publishes nothing: ``save_started``, ``save_completed`` and ``save_failed``
come from the runtime alone.

A save goes one of three ways, which the sink chooses per decision
(:meth:`Sink.plan`):

- ``sync``: :meth:`Sink.execute` writes and commits before it returns.
- ``async``: :meth:`Sink.begin` takes what it needs and returns; at each
  later step boundary the runtime calls :meth:`Sink.poll` until it reports
  the outcome (``poll(wait=True)`` settles it: before a stop, at the end).
- ``deferred``: the training framework writes the files after this step
  boundary (``transformers.Trainer``); :meth:`Sink.begin` prepares, and the
  adapter tells the runtime when the framework saved, which then calls
  ``poll(wait=True)`` to complete it. A deferred save the framework never
  made fails at the next step boundary.

Every method runs on the training thread of every rank at the same point:
a sink may use the collectives of the ``Ranks`` it was started with
(plugins/distributed.py), and nothing else that crosses ranks. A sink never
imports the runtime. Sinks are checked when the runtime is built
(:func:`check_sink`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ._errors import SetupError
from ._events import SaveKind

if TYPE_CHECKING:
    from ._coordinator import Decision

SaveMode = Literal["sync", "async", "deferred"]
SAVE_MODES: tuple[SaveMode, ...] = ("sync", "async", "deferred")


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveRecord:
    """One agreed save as the manifest records it (besides its files and times); the same on every rank."""

    step: int
    kind: SaveKind
    reason: str
    """Why, as the manifest says it: the reasons joined with ``+`` (``signal:SIGINT``, ``file+socket``)."""
    world_size: int
    labels: tuple[str, ...] = ()
    request_ids: tuple[str, ...] = ()
    failure: Mapping[str, Any] | None = None
    """For a checkpoint written after a failure (:meth:`Sink.rescue`): which ranks failed and how, which survived,
    and whether it resumes exactly (the manifest's ``failure``); None for every other save."""

    @classmethod
    def of(cls, decision: Decision, world_size: int) -> SaveRecord:
        """The record of ``decision`` in a run of ``world_size`` ranks."""
        fields = decision.event_fields()
        return cls(
            step=decision.step,
            kind=decision.kind,
            reason=decision.reason,
            world_size=world_size,
            labels=fields["labels"],
            request_ids=fields["request_ids"],
        )

    def manifest_fields(self) -> dict[str, Any]:
        """The manifest's fields for this save (ckptbus/_layout.py writes them)."""
        return {
            "step": self.step,
            "kind": self.kind,
            "reason": self.reason,
            "world_size": self.world_size,
            "labels": list(self.labels),
            "request_ids": list(self.request_ids),
            **({"failure": dict(self.failure)} if self.failure is not None else {}),
        }


@dataclass(frozen=True, slots=True)
class Written:
    """Every rank agreed the checkpoint at ``path`` is committed. The figures are the committer's (what its
    manifest records); on other ranks they may be 0: the runtime shares them."""

    path: Path
    bytes: int = 0
    stall_seconds: float = 0.0
    write_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class NotWritten:
    """Every rank agreed the save failed; nothing was made visible. ``error`` names the stage, rank and cause."""

    error: str


Outcome = Written | NotWritten
"""What a sink reports of one save, the same on every rank."""


class RankView(Protocol):
    """What a sink may ask of the run's ranks (``plugins.distributed.Ranks`` keeps it, with the collectives)."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    @property
    def committer(self) -> bool: ...


class Sink(Protocol):
    """Writes the checkpoint of an agreed step. See the module docstring for the three ways a save goes.

    ``start`` runs once on every rank after the runtime started (the
    output_dir is locked); ``plan`` says how a decision is carried out and
    may reshape it (a framework that saves the step anyway writes a full
    checkpoint); ``abandon`` forgets a save in flight without any collective
    (error paths): its staging is never committed.
    """

    def start(self, ranks: Any, output_dir: Path) -> None: ...

    def plan(self, decision: Decision) -> tuple[Decision, SaveMode]: ...

    def execute(self, record: SaveRecord) -> Outcome: ...

    def begin(self, record: SaveRecord) -> NotWritten | None: ...

    def poll(self, *, wait: bool) -> Outcome | None: ...

    def abandon(self) -> None: ...

    def rank_state(self) -> bytes:
        """This rank's own small state at this step boundary (its RNG states: what a resume needs of each rank
        besides the replicated state), kept by the runtime where the other ranks can read it after this rank
        died (plugins/rank_mirror.py). Called at every step boundary: it must cost microseconds."""
        ...

    def rescue_unsupported(self) -> str | None:
        """Why this rank cannot write a checkpoint alone now (None if it can): state sharded over the ranks, or
        held between two steps."""
        ...

    def rescue(self, record: SaveRecord, rank_states: Mapping[int, bytes]) -> Outcome:
        """Write and commit the checkpoint of ``record.step`` alone, with no collective (a rank failed): the
        replicated state from this rank, each rank's own state from ``rank_states`` (what :meth:`rank_state`
        returned on that rank at that step)."""
        ...


SINK_METHODS = ("start", "plan", "execute", "begin", "poll", "abandon", "rank_state", "rescue_unsupported", "rescue")


def check_sink(sink: object) -> Sink:
    """``sink`` if it keeps the :class:`Sink` contract; raises :class:`~ckptbus.SetupError` naming what is missing."""
    missing = [name for name in SINK_METHODS if not callable(getattr(sink, name, None))]
    if missing:
        raise SetupError(
            f"sink {sink!r} is not a sink: it has no {', '.join(missing)} method "
            "(see ckptbus/_sink.py for the contract)"
        )
    return sink  # type: ignore[return-value]
