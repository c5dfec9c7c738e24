"""Votes of ranks that share one machine, exchanged through a small shared file instead of a collective.

With signals on, the ranks vote at every step. Over gloo, even a pipelined
``all_reduce`` of ten ints costs 1 to 2 ms a step on 2 busy cores (its
threads compete with training), and over NCCL reading the result makes the
host wait for the GPU at every step. When every rank runs on the same machine
(the common case: one node, several GPUs or CPU processes) the vote needs
neither: each rank writes its vote into its own slot of a file in
``/dev/shm`` and reads the slots of the others. Writing and reading cost a few
``pwrite``/``pread`` system calls.

The protocol keeps the contract of a collective: the k-th vote of every rank
is combined with the k-th vote of every other rank (element-wise maximum),
and reading it waits until every rank has written it. Each rank owns a ring
of ``RING`` slots; a slot holds ``[tag, v0 .. v(n-1)]`` where ``tag`` is the
vote's sequence number (1, 2, ...). The data is written before the tag, and
read after it, in separate system calls, which order them for every CPU.
A rank starts vote k only after reading vote k-2 at the latest (the
Coordinator keeps at most one vote in flight beside a blocking one), so no
slot is overwritten before every rank has read it; a reader that finds a
newer tag than it expects raises instead of using it.

A rank that has closed its votes, or whose process is gone, makes the others
raise (a collective would hang or fail the same way); so does a wait longer
than ``timeout``.

Set-up (:meth:`SharedVotes.open`) is collective: rank 0 creates the file and
broadcasts its name, every rank proves it can read what rank 0 wrote and see
every other rank's process, and the file is unlinked at once (the open file
descriptors keep it alive, so nothing is left behind, even after a crash).
Where that fails (ranks on several machines, or in containers that share
nothing) ``open`` returns None on every rank and the caller uses
collectives. ``CKPTBUS_VOTES=collective`` in the environment of any rank
forces that.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import struct
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Protocol

logger = logging.getLogger("ckptbus")

RING = 16
"""Slots per rank; a rank is never more than 2 votes ahead of the slowest reader (module docs)."""

VOTES_ENV = "CKPTBUS_VOTES"
"""``collective``: votes go through torch.distributed collectives; ``auto`` (default): shared memory where it can."""

_WORD = struct.Struct("<q")
_TOKEN_WORDS = 2  # 16 random bytes that prove a rank opened rank 0's file
_CLOSED = -1  # a rank's pid word once it closed its votes
_LIVENESS_SECONDS = 0.5  # how often a waiting rank checks that the ranks it waits for still exist
_MAX_SLEEP = 0.0002  # a wait overshoots the peer's vote by at most this


def shared_memory_dir() -> str:
    """Where the vote file lives: ``/dev/shm`` (RAM) when it exists, else the temporary directory."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


class SetUpChannel(Protocol):
    """What the set-up needs from the run's collectives (plugins/distributed.py's ``TorchExchange``)."""

    def __call__(self, vote: Sequence[int]) -> list[int]: ...

    def broadcast_name(self, name: str) -> str: ...

    def timeout(self) -> timedelta: ...


class SharedVotesError(RuntimeError):
    """Another rank left, or did not vote in time."""


class SharedVotes:
    """Element-wise maximum of a ``length``-int vote over the ranks of one machine, through a shared file.

    Same interface as the collective exchange: call it for a blocking vote,
    or :meth:`start` one and ``wait()`` on the result later. Every rank must
    call in the same order with the same ``length``.
    """

    def __init__(self, fd: int, rank: int, world_size: int, length: int, timeout: float) -> None:
        self._fd = fd
        self.rank = rank
        self.world_size = world_size
        self.length = length
        self.timeout = timeout
        self._sent = 0  # sequence number of this rank's last vote
        self._data = struct.Struct(f"<{length}q")
        self._pids: list[int] = []
        self.peer_failure: Callable[[int], str | None] | None = None
        """Asked while waiting for a rank's vote: why that rank will never vote (it raised and said so), or None."""

    # -- set-up -------------------------------------------------------------

    @classmethod
    def open(
        cls,
        rank: int,
        world_size: int,
        length: int,
        exchange: SetUpChannel,
        *,
        directory: str | None = None,
        timeout: timedelta | None = None,
        extra_bytes: int = 0,
    ) -> SharedVotes | None:
        """Collective (every rank calls it): the shared votes of this run, or None where ranks cannot share them.

        ``exchange`` is the run's collective (element-wise max), used a few
        times here, with its ``broadcast_name`` for the file's name.
        ``timeout``: how long a vote waits for a rank that is alive but does
        not vote; by default that of the process group (30 minutes unless the
        run set another), so a long evaluation on one rank is no more fatal
        than with a collective.
        ``extra_bytes``: room after the votes for the ranks' mirror
        (plugins/rank_mirror.py), at :attr:`extra_offset`, zeroed.
        """
        if world_size < 2:
            return None
        timeout = timeout or exchange.timeout()
        # Asked on every rank, so that all of them take the same path (one rank alone skipping the set-up's
        # collectives would leave the others waiting in them).
        wanted = os.environ.get(VOTES_ENV, "auto").strip().lower() or "auto"
        if wanted not in ("auto", "collective"):
            logger.warning("ckptbus: %s=%r is neither 'auto' nor 'collective'; using 'auto'", VOTES_ENV, wanted)
        if exchange([int(wanted == "collective")])[0]:
            return None
        size = _file_words(world_size, length) * _WORD.size + extra_bytes
        name = [""]
        fd = -1
        problem = ""
        try:
            if rank == 0:
                fd, name[0] = tempfile.mkstemp(prefix="ckptbus-votes-", dir=directory or shared_memory_dir())
                os.ftruncate(fd, size)
                os.pwrite(fd, secrets.token_bytes(_TOKEN_WORDS * _WORD.size), 0)
        except OSError as exc:
            problem = f"cannot create the vote file: {exc}"
        name[0] = exchange.broadcast_name(name[0])
        votes: SharedVotes | None = None
        try:
            if rank != 0 and name[0]:
                fd = os.open(name[0], os.O_RDWR)
            if fd >= 0:
                votes = cls(fd, rank, world_size, length, timeout.total_seconds())
                votes._write_word(_TOKEN_WORDS + rank, os.getpid())
        except OSError as exc:
            problem = problem or f"cannot open {name[0]}: {exc}"
        # Every rank has written its pid (or failed): check the token and the others' processes.
        token = _token_ints(fd) if votes is not None else [0] * _TOKEN_WORDS
        common = exchange([int(votes is None)] + token + [-x for x in token])
        highest, lowest = common[1 : 1 + _TOKEN_WORDS], [-x for x in common[1 + _TOKEN_WORDS :]]
        if votes is not None and not common[0] and highest == token == lowest:
            problem = votes._learn_peers()
        elif not problem:
            problem = "the ranks do not see the same vote file (several machines?)"
        failed = exchange([int(bool(problem))])[0]  # also the barrier after which the file may go
        if rank == 0 and name[0]:
            with contextlib.suppress(OSError):
                os.unlink(name[0])
        if failed or votes is None:
            if problem:
                logger.debug("ckptbus: shared votes unavailable on rank %d: %s", rank, problem)
            if fd >= 0:
                os.close(fd)
            return None
        return votes

    def _learn_peers(self) -> str:
        pids = [self._read_word(_TOKEN_WORDS + r) for r in range(self.world_size)]
        for r, pid in enumerate(pids):
            if pid <= 0 or not process_exists(pid):
                return f"rank {r}'s process ({pid}) is not visible from rank {self.rank} (another machine or container)"
        self._pids = pids
        return ""

    @property
    def fd(self) -> int:
        """The shared file (for the mirror in its extra bytes); -1 once closed."""
        return self._fd

    @property
    def extra_offset(self) -> int:
        """Where the extra bytes asked for at :meth:`open` begin."""
        return _file_words(self.world_size, self.length) * _WORD.size

    @property
    def pids(self) -> list[int]:
        """The process of every rank, in rank order."""
        return list(self._pids)

    # -- votes --------------------------------------------------------------

    def __call__(self, vote: Sequence[int]) -> list[int]:
        return self.start(vote).wait()

    def start(self, vote: Sequence[int]) -> _PendingSharedVote:
        """Publish this rank's next vote; ``wait()`` on the result combines it with every rank's."""
        if self._fd < 0:
            raise SharedVotesError("the shared votes are closed")
        if len(vote) != self.length:
            raise ValueError(f"vote has {len(vote)} ints, the shared votes take {self.length}")
        self._sent += 1
        slot = self._slot_offset(self.rank, self._sent)
        os.pwrite(self._fd, self._data.pack(*vote), slot + _WORD.size)
        os.pwrite(self._fd, _WORD.pack(self._sent), slot)  # the tag last: readers trust the data once they see it
        return _PendingSharedVote(self, self._sent, list(vote))

    def close(self) -> None:
        """Leave: ranks waiting for a vote of this one raise instead of waiting. Safe to call twice."""
        if self._fd < 0:
            return
        try:
            self._write_word(_TOKEN_WORDS + self.rank, _CLOSED)
        finally:
            os.close(self._fd)
            self._fd = -1

    def _collect(self, number: int, own: list[int]) -> list[int]:
        """The maximum of every rank's vote ``number`` (waits until each has written it)."""
        result = list(own)
        deadline = time.monotonic() + self.timeout
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            slot = self._slot_offset(rank, number)
            sleep = 0.0
            next_liveness = time.monotonic() + _LIVENESS_SECONDS
            while True:
                if self._fd < 0:
                    raise SharedVotesError("the shared votes are closed")
                tag = _WORD.unpack(os.pread(self._fd, _WORD.size, slot))[0]
                if tag == number:
                    theirs = self._data.unpack(os.pread(self._fd, self._data.size, slot + _WORD.size))
                    result = [max(a, b) for a, b in zip(result, theirs, strict=True)]
                    break
                if tag > number:
                    raise SharedVotesError(
                        f"rank {rank} is {tag - number} votes ahead of rank {self.rank}: the ranks do not vote in "
                        f"the same order (set {VOTES_ENV}=collective to use collectives, and report this)"
                    )
                now = time.monotonic()
                if now >= next_liveness:
                    self._check_alive(rank, number)
                    next_liveness = now + _LIVENESS_SECONDS
                    if now >= deadline:
                        raise SharedVotesError(
                            f"rank {rank} did not vote within {self.timeout:g} s (vote {number}); it may be stuck"
                        )
                # Sleep a little, longer each time: a spin would take the CPU from the rank being waited for.
                time.sleep(sleep)
                sleep = min(_MAX_SLEEP, sleep * 2 or 20e-6)
        return result

    def _check_alive(self, rank: int, number: int) -> None:
        pid = self._read_word(_TOKEN_WORDS + rank)
        if pid == _CLOSED:
            raise SharedVotesError(f"rank {rank} left the run before its vote {number} (it closed its checkpointing)")
        failure = self.peer_failure(rank) if self.peer_failure is not None else None
        if failure is not None:
            raise SharedVotesError(f"{failure}; its vote {number} will never come")
        if not process_exists(self._pids[rank]):
            raise SharedVotesError(f"rank {rank} (pid {self._pids[rank]}) is gone; its vote {number} never came")

    # -- file layout --------------------------------------------------------

    def _slot_offset(self, rank: int, number: int) -> int:
        words = 1 + self.length
        index = _TOKEN_WORDS + self.world_size + (rank * RING + number % RING) * words
        return index * _WORD.size

    def _read_word(self, index: int) -> int:
        return int(_WORD.unpack(os.pread(self._fd, _WORD.size, index * _WORD.size))[0])

    def _write_word(self, index: int, value: int) -> None:
        os.pwrite(self._fd, _WORD.pack(value), index * _WORD.size)


class _PendingSharedVote:
    """One started shared vote; ``wait()`` reads it (once, then the result is kept)."""

    __slots__ = ("_number", "_own", "_result", "_votes")

    def __init__(self, votes: SharedVotes, number: int, own: list[int]) -> None:
        self._votes = votes
        self._number = number
        self._own = own
        self._result: list[int] | None = None

    def wait(self) -> list[int]:
        if self._result is None:
            self._result = self._votes._collect(self._number, self._own)
        return list(self._result)


def _file_words(world_size: int, length: int) -> int:
    return _TOKEN_WORDS + world_size + world_size * RING * (1 + length)


def _token_ints(fd: int) -> list[int]:
    raw = os.pread(fd, _TOKEN_WORDS * _WORD.size, 0)
    return [int(_WORD.unpack_from(raw, i * _WORD.size)[0]) for i in range(_TOKEN_WORDS)]


def process_exists(pid: int) -> bool:
    """Whether ``pid`` runs: a process that exited but was not reaped yet (a zombie) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc to ask: trust kill()
    return state not in (b"Z", b"X")


__all__ = ["RING", "VOTES_ENV", "SharedVotes", "SharedVotesError", "process_exists", "shared_memory_dir"]
