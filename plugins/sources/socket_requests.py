"""The socket's save requests: which are outstanding, who waits for each, and which one a new request joins.

No sockets and no threads here: the server asks :class:`SocketRequests` what
a request becomes and who an outcome answers, and does the I/O itself. A
waiter is whatever the server wants handed back when a request is settled
(the server uses a future per waiting connection).

A request joins an outstanding one of the same kind, or an outstanding
``full`` one (which holds the weights too), when it has no label or the same
label; a request with a new label is published on its own so that its label
is recorded (requests pending at the same vote still become one save).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from ckptbus import SaveCompleted, SaveFailed, SaveKind, SaveRequested
from ckptbus._protocol import SaveRequest

MAX_OUTSTANDING: Final = 32
"""Socket requests published and not yet answered; more (that join none of them) are refused as busy."""

W = TypeVar("W")


@dataclass(frozen=True, slots=True)
class Admitted:
    """What a save request became: the outstanding request that serves it."""

    request_id: str
    shared: bool
    """True when it joined a request that was already outstanding."""
    publish: SaveRequested | None
    """The event to publish on the bus for a new request; None when it joined one."""


@dataclass(frozen=True, slots=True)
class _Outstanding:
    kind: SaveKind
    label: str | None

    def serves(self, request: SaveRequest) -> bool:
        return self.kind in (request.kind, "full") and request.label in (None, self.label)


class SocketRequests(Generic[W]):
    """Outstanding socket requests and their waiters. Not thread-safe: the server's thread owns it."""

    __slots__ = ("_limit", "_outstanding", "_reason", "_waiting")

    def __init__(self, *, reason: str, limit: int = MAX_OUTSTANDING) -> None:
        self._reason = reason
        self._limit = limit
        self._outstanding: dict[str, _Outstanding] = {}
        self._waiting: dict[str, list[W]] = {}

    def admit(self, request: SaveRequest) -> Admitted | None:
        """The outstanding request that serves ``request`` (a new one if none does); None when too many are."""
        for request_id, outstanding in self._outstanding.items():
            if outstanding.serves(request):
                return Admitted(request_id, shared=True, publish=None)
        if len(self._outstanding) >= self._limit:
            return None
        event = SaveRequested(kind=request.kind, reason=self._reason, label=request.label)
        self._outstanding[event.request_id] = _Outstanding(request.kind, request.label)
        return Admitted(event.request_id, shared=False, publish=event)

    def wait(self, request_id: str, waiter: W) -> None:
        """Hand ``waiter`` back when ``request_id`` is settled or abandoned; ``KeyError`` if it is not outstanding."""
        if request_id not in self._outstanding:
            raise KeyError(f"request {request_id!r} is not outstanding")
        self._waiting.setdefault(request_id, []).append(waiter)

    def leave(self, request_id: str, waiter: W) -> None:
        """``waiter`` no longer waits (its client left); the request stays outstanding. Unknown ones are ignored."""
        waiters = self._waiting.get(request_id, [])
        if waiter in waiters:
            waiters.remove(waiter)

    def settle(self, outcome: SaveCompleted | SaveFailed) -> list[tuple[str, list[W]]]:
        """The requests of ours that ``outcome`` answers, each with its waiters; they are no longer outstanding."""
        settled = []
        for request_id in outcome.request_ids:
            if self._outstanding.pop(request_id, None) is not None:
                settled.append((request_id, self._waiting.pop(request_id, [])))
        return settled

    def abandon(self) -> list[tuple[str, list[W]]]:
        """Every request that has waiters, with them (the server is stopping); nothing stays outstanding."""
        abandoned = [(request_id, waiters) for request_id, waiters in self._waiting.items() if waiters]
        self._outstanding.clear()
        self._waiting.clear()
        return abandoned

    def snapshot(self) -> list[dict[str, object]]:
        """The outstanding requests for a status reply: id, kind, label and how many clients wait."""
        return [
            {"request_id": rid, "kind": o.kind, "label": o.label, "waiting": len(self._waiting.get(rid, ()))}
            for rid, o in self._outstanding.items()
        ]
