"""A fake exchange that drives N ranks on threads of one process: the step protocol tested in seconds.

:class:`ThreadGroup` gives each rank a :class:`ThreadCollective`, which keeps
the ``Collective`` protocol of plugins/distributed.py (what ``TorchExchange``
offers over gloo or NCCL): element-wise max, a started vote read later, an
all-gather, rank 0's name. :func:`run_ranks` runs ``fn(rank, collective)``
on one thread per rank and returns what each returned.

How it pairs calls: the k-th collective call of every rank meets the k-th of
every other rank, as with ``torch.distributed`` (one process group, calls in
issue order). Each rank drops its contribution into slot k and goes on; a
blocking call then waits until every rank has filled slot k. There is no
barrier, so a vote started at step N and read at step N+1, with other
collectives between, cannot deadlock, exactly as an ``async_op`` all_reduce.

It is stricter than gloo where that helps find protocol bugs:

- the k-th calls of all ranks must be the same operation (a ``max`` meeting
  an ``all_gather`` is a :class:`CollectiveMismatch`, where gloo would hang
  or return garbage), and votes must have the same length;
- every wait has a deadline (``timeout``): a rank that never comes fails the
  test with :class:`CollectiveTimeout`, naming the rank and the slot,
  instead of hanging CI;
- a rank whose function raised breaks the group (:meth:`ThreadGroup.abort`):
  the others' waits raise :class:`GroupBroken` at once, and :func:`run_ranks`
  re-raises the first real exception, noted with the rank that raised it;
- :attr:`ThreadGroup.calls` counts each rank's collective calls (a test
  proves a path runs none), and :meth:`ThreadGroup.unmatched` lists slots
  some rank never reached (a rank that made a collective the others did not).

Threads are not processes: the ranks share memory, environment and files.
The runtime keeps its state per object, so that is fine for it; module-level
state (accelerate's ``AcceleratorState``) is shared, and a test says so where
that matters.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0
"""Seconds one collective waits for the other ranks: generous on 2 busy cores, short next to CI's patience."""


class ThreadExchangeError(RuntimeError):
    """A collective between thread ranks went wrong (a protocol bug, or a rank that failed)."""


class CollectiveMismatch(ThreadExchangeError):
    """The ranks' k-th collective calls are not the same operation (or the votes differ in length)."""


class CollectiveTimeout(ThreadExchangeError):
    """A rank waited longer than the group's timeout for the others to reach a collective."""


class GroupBroken(ThreadExchangeError):
    """Another rank failed: every wait of the group raises this instead of waiting."""


@dataclass(slots=True)
class _Slot:
    """The k-th collective call of every rank: what each rank put in, and how many have read the result."""

    op: str
    values: dict[int, Any] = field(default_factory=dict)
    where: dict[int, str] = field(default_factory=dict)
    reads: int = 0


class ThreadGroup:
    """The exchange of ``world_size`` ranks running on threads of this process. See the module docstring."""

    def __init__(self, world_size: int, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.timeout = timeout
        self.calls = [0] * world_size
        """How many collective calls each rank made (a started vote counts when it is started)."""
        self._cond = threading.Condition()
        self._slots: dict[int, _Slot] = {}
        self._broken: str | None = None

    def collective(self, rank: int) -> ThreadCollective:
        """Rank ``rank``'s collective (one per rank: it counts that rank's calls)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size}")
        return ThreadCollective(self, rank)

    def abort(self, why: str) -> None:
        """Break the group: every wait, now or later, raises :class:`GroupBroken` with ``why``."""
        with self._cond:
            if self._broken is None:
                self._broken = why
            self._cond.notify_all()

    def unmatched(self) -> list[str]:
        """Slots that some ranks reached and others did not: one line each (empty when the ranks line up)."""
        with self._cond:
            return [
                f"collective #{seq} ({slot.op}): reached by ranks {sorted(slot.values)} only"
                for seq, slot in sorted(self._slots.items())
                if len(slot.values) < self.world_size
            ]

    def run(
        self, fn: Callable[[int, ThreadCollective], T], *, join_timeout: float | None = None, matched: bool = True
    ) -> list[T]:
        """Run ``fn(rank, collective)`` on one thread per rank; return the results in rank order.

        If any rank raises, the group is broken (the others' collectives raise
        at once) and the first exception that is not a consequence of that is
        re-raised here, with a note naming its rank. A rank still running
        ``join_timeout`` seconds (default: twice the collective timeout) after
        the others is reported with its stack, and the test fails. ``matched``:
        also fail when the ranks ended having made different collectives
        (:meth:`unmatched`).
        """
        results: dict[int, T] = {}
        errors: list[tuple[int, BaseException]] = []
        lock = threading.Lock()

        def body(rank: int) -> None:
            try:
                value = fn(rank, self.collective(rank))
            except BaseException as exc:
                with lock:
                    errors.append((rank, exc))
                self.abort(f"rank {rank} raised {type(exc).__name__}: {exc}")
            else:
                with lock:
                    results[rank] = value

        threads = [
            threading.Thread(target=body, args=(rank,), name=f"thread-rank-{rank}", daemon=True)
            for rank in range(self.world_size)
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + (join_timeout if join_timeout is not None else 2 * self.timeout)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        hung = [t for t in threads if t.is_alive()]
        if hung:
            self.abort("the test gave up waiting for a rank")
            frames = sys._current_frames()
            stacks = "\n".join(
                f"{t.name}:\n{''.join(traceback.format_stack(frames[t.ident]))}"
                for t in hung
                if t.ident is not None and t.ident in frames
            )
            for thread in hung:
                thread.join(self.timeout)  # its waits raise GroupBroken now: let it end before the leak guard looks
            raise ThreadExchangeError(f"ranks still running after the deadline:\n{stacks}")
        if errors:
            rank, exc = next(((r, e) for r, e in errors if not isinstance(e, GroupBroken)), errors[0])
            exc.add_note(f"(raised on rank {rank} of {self.world_size}, thread_ranks.run_ranks)")
            raise exc
        unmatched = self.unmatched() if matched else []
        if unmatched:
            raise CollectiveMismatch("the ranks ended having made different collectives:\n" + "\n".join(unmatched))
        return [results[rank] for rank in range(self.world_size)]

    # -- the pairing (used by ThreadCollective) ------------------------------------------------------------------

    def _put(self, rank: int, op: str, value: Any) -> int:
        """Drop ``rank``'s contribution to its next collective; return the slot's number. Never waits."""
        where = _caller()
        with self._cond:
            seq = self.calls[rank]
            self.calls[rank] += 1
            slot = self._slots.setdefault(seq, _Slot(op))
            if slot.op != op:
                other = min(slot.values)
                raise CollectiveMismatch(
                    f"collective #{seq}: rank {rank} calls {op} at {where}, rank {other} called {slot.op} at "
                    f"{slot.where[other]}: the ranks do not call the same collectives in the same order"
                )
            slot.values[rank] = value
            slot.where[rank] = where
            self._cond.notify_all()
        return seq

    def _take(self, rank: int, seq: int) -> list[Any]:
        """Every rank's contribution to slot ``seq``, in rank order, once all arrived (waits up to the timeout)."""
        deadline = time.monotonic() + self.timeout
        with self._cond:
            slot = self._slots[seq]
            while len(slot.values) < self.world_size:
                if self._broken is not None:
                    raise GroupBroken(f"rank {rank}, collective #{seq} ({slot.op}): {self._broken}")
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(range(self.world_size)) - set(slot.values))
                    raise CollectiveTimeout(
                        f"rank {rank} waited {self.timeout:g} s in collective #{seq} ({slot.op}, called at "
                        f"{slot.where[rank]}) for ranks {missing}, which never reached it"
                    )
                self._cond.wait(min(left, 0.5))
            values = [slot.values[r] for r in range(self.world_size)]
            slot.reads += 1
            if slot.reads == self.world_size:
                del self._slots[seq]
            return values


def _caller() -> str:
    """Where the collective was called from, outside this module: ``file:line in function``."""
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    return f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno} in {frame.f_code.co_name}"


def _max(votes: Sequence[Sequence[int]], rank: int, seq: int) -> list[int]:
    lengths = {len(v) for v in votes}
    if len(lengths) > 1:
        raise CollectiveMismatch(
            f"rank {rank}, collective #{seq}: the ranks' votes differ in length ({[len(v) for v in votes]})"
        )
    return [max(slot) for slot in zip(*votes, strict=True)]


class _StartedVote:
    """A vote started and not read yet; ``wait()`` reads it (once; later calls give the same result)."""

    __slots__ = ("_group", "_rank", "_result", "_seq")

    def __init__(self, group: ThreadGroup, rank: int, seq: int) -> None:
        self._group, self._rank, self._seq = group, rank, seq
        self._result: list[int] | None = None

    def wait(self) -> list[int]:
        if self._result is None:
            self._result = _max(self._group._take(self._rank, self._seq), self._rank, self._seq)
        return list(self._result)


class ThreadCollective:
    """One rank's view of a :class:`ThreadGroup`: the ``Collective`` protocol of plugins/distributed.py."""

    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group = group
        self.rank = rank
        self.world_size = group.world_size

    def __call__(self, vote: Sequence[int]) -> list[int]:
        """Element-wise max of ``vote`` over the ranks (blocks until every rank voted)."""
        return self.start(vote).wait()

    def start(self, vote: Sequence[int]) -> _StartedVote:
        """Put this rank's vote in and go on; ``wait()`` on the result reads the max (``async_op``)."""
        return _StartedVote(self.group, self.rank, self.group._put(self.rank, "max", [int(x) for x in vote]))

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        return self.group._take(self.rank, self.group._put(self.rank, "all_gather", obj))

    def broadcast_name(self, name: str) -> str:
        """Rank 0's ``name`` on every rank."""
        return str(self.group._take(self.rank, self.group._put(self.rank, "broadcast_name", name))[0])

    def on_host(self) -> ThreadCollective:
        return self  # nothing lives on a GPU here

    def timeout(self) -> timedelta:
        return timedelta(seconds=self.group.timeout)


def run_ranks(
    world_size: int, fn: Callable[[int, ThreadCollective], T], *, timeout: float = DEFAULT_TIMEOUT
) -> list[T]:
    """Run ``fn(rank, collective)`` for ``world_size`` ranks on threads; their results in rank order.

    The first exception of a rank is re-raised (noted with its rank), and ranks that end having made different
    collectives fail; see :meth:`ThreadGroup.run`.
    """
    return ThreadGroup(world_size, timeout=timeout).run(fn)
