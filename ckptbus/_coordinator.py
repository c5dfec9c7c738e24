"""Rank agreement: which step saves, what kind, and whether training stops.

Receivers of ``save_requested`` only enqueue (:meth:`Coordinator.enqueue` is
safe from any thread). On the training thread, at a step boundary that every
rank computes the same way (:meth:`Coordinator.is_due`), each rank turns what
it has pending into a vote and one collective combines the votes of *every*
rank (an element-wise maximum): a request that reached one rank only still
leads to one save on all ranks.

This module knows nothing of torch: the collective is a function handed in
(``exchange``), so the logic is the same for gloo, NCCL and one process.
"""

from __future__ import annotations

import queue
import signal
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from ._events import SaveKind, SaveRequested

Exchange = Callable[[Sequence[int]], list[int]]
"""Element-wise maximum of an int vector over all ranks (identity with one rank)."""


class PendingVote(Protocol):
    """A vote exchange that was started and runs while training goes on."""

    def wait(self) -> list[int]:
        """The element-wise maximum over all ranks (blocks until every rank's vote arrived)."""
        ...


StartExchange = Callable[[Sequence[int]], PendingVote]
"""Starts the same exchange as :data:`Exchange` without waiting for it."""

KNOWN_REASONS: Final = ("schedule", "file", "signal", "socket", "api", "other")

# Vote layout: [full, weights, exit_after, signal number, <one slot per reason>]
_FULL, _WEIGHTS, _EXIT, _SIGNUM = 0, 1, 2, 3
_REASON0 = 4
VOTE_LENGTH: Final = _REASON0 + len(KNOWN_REASONS)


def signal_number(reason: str) -> int:
    """The signal number in a reason like ``signal:SIGTERM`` (0 for other reasons or unknown names)."""
    kind, _, name = reason.partition(":")
    if kind != "signal":
        return 0
    try:
        return int(signal.Signals[name])
    except KeyError:
        return 0


def exit_status(stopped: bool, signum: int, save_failed: bool) -> int:
    """What a training script exits with: ``128 + signal number`` after a stop a signal asked for,
    1 after a stop that left the run unfinished (``save_failed``: a save failed with ``on_save_failure: stop``,
    or the launcher is gone), else 0."""
    if stopped and signum:
        return 128 + signum
    return 1 if save_failed else 0


def reason_table(declared: Iterable[str] = ()) -> tuple[str, ...]:
    """The reasons a run's votes carry: :data:`KNOWN_REASONS` with the ``declared`` ones of its sources added
    (sorted, before ``other``), so every rank that declared the same reasons builds the same table."""
    extra = sorted(set(declared) - set(KNOWN_REASONS))
    return (*KNOWN_REASONS[:-1], *extra, KNOWN_REASONS[-1])


def reason_slot(reason: str, reasons: Sequence[str] = KNOWN_REASONS) -> int:
    """Vote slot of ``reason``; reasons outside ``reasons`` travel as ``other``."""
    base = reason.split(":", 1)[0]
    name = base if base in reasons else "other"
    return _REASON0 + list(reasons).index(name)


@dataclass(frozen=True, slots=True)
class Decision:
    """What every rank agreed to do at ``step``."""

    step: int
    kind: SaveKind
    exit_after: bool
    reasons: tuple[str, ...]
    """Reasons of all ranks, in the order of the run's reason table (``other`` for reasons no source declared)."""
    requests: tuple[SaveRequested, ...]
    """The requests of *this* rank that the save serves."""
    signum: int = 0
    """The (highest) signal number that asked for this save on any rank; 0 if none did."""

    @property
    def reason(self) -> str:
        """The reasons joined with ``+``; a signal is named (``signal:SIGTERM``) so the manifest says which."""
        if self.signum and "signal" in self.reasons:
            named = f"signal:{signal.Signals(self.signum).name}"
            return "+".join(named if r == "signal" else r for r in self.reasons)
        return "+".join(self.reasons)

    def event_fields(self, kind: SaveKind | None = None) -> dict[str, Any]:
        """The fields every event about this save carries (``kind``: what is written, if not the agreed kind)."""
        return {
            "step": self.step,
            "kind": kind or self.kind,
            "reasons": self.reasons,
            "request_ids": tuple(r.request_id for r in self.requests),
            "labels": tuple(r.label for r in self.requests if r.label),
            "exit_after": self.exit_after,
        }


def encode_vote(
    requests: Sequence[SaveRequested], scheduled: bool, reasons: Sequence[str] = KNOWN_REASONS
) -> list[int]:
    """This rank's vote: which kinds, whether to exit, and why (one slot per entry of ``reasons``)."""
    vote = [0] * (_REASON0 + len(reasons))
    if scheduled:
        vote[_FULL] = 1
        vote[reason_slot("schedule", reasons)] = 1
    for request in requests:
        vote[_FULL if request.kind == "full" else _WEIGHTS] = 1
        vote[_EXIT] = max(vote[_EXIT], int(request.exit_after))
        vote[reason_slot(request.reason, reasons)] = 1
        vote[_SIGNUM] = max(vote[_SIGNUM], signal_number(request.reason))
    return vote


def decode_vote(
    step: int, vote: Sequence[int], requests: Sequence[SaveRequested], reasons: Sequence[str] = KNOWN_REASONS
) -> Decision | None:
    """The decision the combined ``vote`` stands for, or None when nobody asked.

    A full save covers a weights request at the same step (``save_state``
    writes the model weights too), so ``full`` wins when both were asked.
    """
    if len(vote) != _REASON0 + len(reasons):
        raise ValueError(f"vote has {len(vote)} slots, expected {_REASON0 + len(reasons)}")
    if not (vote[_FULL] or vote[_WEIGHTS]):
        return None
    kind: SaveKind = "full" if vote[_FULL] else "weights"
    named = tuple(r for i, r in enumerate(reasons) if vote[_REASON0 + i])
    return Decision(step, kind, bool(vote[_EXIT]), named, tuple(requests), int(vote[_SIGNUM]))


class Coordinator:
    """Collects requests and, at due steps, agrees with the other ranks on a decision.

    ``check_interval``: votes are exchanged at steps divisible by it.
    ``every_step``: exchange at every step instead (sources that must be
    honoured within one step, such as Ctrl+C, turn this on).
    ``save_steps``: a full save is scheduled at steps divisible by it.
    ``exchange`` and ``start_exchange`` may be replaced between steps (a
    Trainer learns its world size only when training begins).
    ``reasons``: the run's reason table (:func:`reason_table`), the same on every rank.
    ``start_exchange``: with ``every_step``, the votes of steps that are
    neither a ``check_interval`` multiple nor scheduled are *pipelined*: the
    exchange is started at step N and read at step N+1, so it runs while step
    N+1 computes instead of holding every rank at each step (a blocking
    collective on every step cost 2-3 ms a step on 2 CPU cores). A request
    voted that way is saved at step N+1; at ``check_interval`` multiples and
    scheduled steps the vote blocks as without pipelining, so file-triggered
    and scheduled saves land exactly on those steps.
    """

    __slots__ = (
        "_carried",
        "_held",
        "_in_flight",
        "_queue",
        "check_interval",
        "every_step",
        "exchange",
        "reasons",
        "save_steps",
        "start_exchange",
    )

    def __init__(
        self,
        exchange: Exchange,
        *,
        check_interval: int,
        save_steps: int | None = None,
        every_step: bool = False,
        start_exchange: StartExchange | None = None,
        reasons: Sequence[str] = KNOWN_REASONS,
    ) -> None:
        if check_interval < 1:
            raise ValueError(f"check_interval must be >= 1, got {check_interval}")
        self.exchange = exchange
        self.start_exchange = start_exchange
        # SimpleQueue.put is reentrant: safe from signal handlers and threads.
        self._queue: queue.SimpleQueue[SaveRequested] = queue.SimpleQueue()
        self._held: list[SaveRequested] = []  # off the queue, in no vote yet
        self._carried: list[SaveRequested] = []  # in the vote that is in flight
        self._in_flight: PendingVote | None = None
        self.check_interval = check_interval
        self.every_step = every_step
        self.save_steps = save_steps
        self.reasons = tuple(reasons)

    @property
    def vote_length(self) -> int:
        """How many ints one vote has (the exchange must carry that many)."""
        return _REASON0 + len(self.reasons)

    @property
    def pipelined(self) -> bool:
        """Whether the votes of ordinary steps are read one step after they were started."""
        return self.every_step and self.start_exchange is not None

    @property
    def vote_in_flight(self) -> bool:
        """Whether a started vote waits to be read by the next :meth:`decide`."""
        return self._in_flight is not None

    def enqueue(self, request: SaveRequested) -> None:
        """Record a request; it is voted on at the next due step. Safe from any thread."""
        self._queue.put(request)

    def pending(self) -> list[SaveRequested]:
        """Requests of this rank not yet decided on (moves them off the thread-safe queue)."""
        while True:
            try:
                self._held.append(self._queue.get_nowait())
            except queue.Empty:
                return self._carried + self._held

    def pending_count(self) -> int:
        """How many requests wait for a decision (approximate from other threads; exact on the training thread)."""
        return len(self._carried) + len(self._held) + self._queue.qsize()

    def is_scheduled(self, step: int) -> bool:
        return self.save_steps is not None and step > 0 and step % self.save_steps == 0

    def is_due(self, step: int) -> bool:
        """Whether ranks exchange votes at ``step``. The same answer on every rank."""
        return self.every_step or step % self.check_interval == 0 or self.is_scheduled(step)

    def blocks_at(self, step: int) -> bool:
        """Whether :meth:`decide` waits at ``step`` for a vote started at that very step."""
        if self.pipelined:
            return step % self.check_interval == 0 or self.is_scheduled(step)
        return self.is_due(step)

    def decide(self, step: int, *, force: bool = False, scheduled: bool = True) -> Decision | None:
        """At a due step (or when ``force``d, e.g. at the end), exchange votes; return the decision.

        Must be called by every rank at the same step with the same ``force``.
        ``scheduled=False`` leaves the ``save_steps`` schedule out (at close,
        the last step's scheduled save already happened in :meth:`decide`).
        A vote in flight (see ``start_exchange``) is read first and merged
        with this step's; a new one is started only when nothing was decided
        and nothing is ``force``d, so none is left running past a save or
        the end. On a collective error the local requests stay pending and
        the error propagates.
        """
        blocking = force or self.blocks_at(step)
        if not (blocking or self.pipelined or self._in_flight is not None):
            return None
        self.pending()  # off the thread-safe queue
        votes: list[list[int]] = []
        voted: list[SaveRequested] = []
        try:
            if self._in_flight is not None:
                in_flight, self._in_flight = self._in_flight, None
                voted, self._carried = self._carried, []
                votes.append(in_flight.wait())
            if blocking:
                fresh, self._held = self._held, []
                voted += fresh
                votes.append(self.exchange(encode_vote(fresh, scheduled and self.is_scheduled(step), self.reasons)))
        except BaseException:
            self._held[:0] = voted  # requests are consumed only once every rank agreed
            raise
        combined = [max(slot) for slot in zip(*votes, strict=True)]
        decision = decode_vote(step, combined, voted, self.reasons) if votes else None
        if decision is None:
            self._held[:0] = voted  # (empty: a request always makes its vote count)
            if self.pipelined and not force:
                self._start(self._held)
        return decision

    def _start(self, requests: list[SaveRequested]) -> None:
        assert self.start_exchange is not None
        self._in_flight = self.start_exchange(encode_vote(requests, False, self.reasons))
        self._carried, self._held = requests, []

    def drain(self) -> list[SaveRequested]:
        """Remove and return every pending request (used at close, to answer them). A vote in flight is dropped."""
        requests = self.pending()
        self._held, self._carried, self._in_flight = [], [], None
        return requests
