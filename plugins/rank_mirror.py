"""What each rank leaves behind for the others: its small state of every step, and how it ended.

Under replicated state (one process per rank, DDP) every rank holds the
whole model, optimizer and scheduler; what is its own is small (its RNG
states: about 10 KB). When a rank dies, the survivors can still write a
full checkpoint, as long as they have that small state of the dead rank
for the step they save. So at every step boundary each rank copies it into
its area of the shared file the ranks vote through (plugins/shared_votes.py,
``/dev/shm`` on one machine), where it outlives the process.

The file is the ranks' only channel once one of them is gone: no collective
goes through a dead rank. Per rank it holds a status word (running, failed
with an exception, rescuing), a short message
(the exception a failed rank raised), and two records of its small state.
A record is written whole into the buffer that does not hold the newest
one, header last, with a CRC: a rank killed in the middle of a write leaves
the other buffer intact. A global area says which step was rescued, by
whom, and where it went.

Who writes the rescue is decided by an exclusive ``flock`` on the shared
file: the first survivor to take it writes and records the result; a rank
that dies while holding it releases it (the kernel does), and the next one
finds the step not recorded and writes it again into a fresh staging
directory. See plugins/rescue.py for the protocol that uses this.
"""

from __future__ import annotations

import fcntl
import os
import struct
import tempfile
import time
import zlib
from dataclasses import dataclass

from .shared_votes import SharedVotes, process_exists, shared_memory_dir

RECORD_BYTES = 32 * 1024
"""Room for one record of a rank's small state (RNG states of CPU and every CUDA device fit many times)."""

MESSAGE_BYTES = 512
"""Room for a failed rank's exception, as one line."""

RUNNING, FAILED, RESCUING, UNABLE, SETTLING = 0, 1, 2, 3, 4
"""A rank's status: training; raised an exception (and may write the rescue); saw another rank fail and may write
the rescue; failed or saw a failure, and cannot write the rescue alone; stopped training and is finding out which
of those it is (plugins/rescue.py)."""

_WORD = struct.Struct("<q")
_HEADER = struct.Struct("<qqq")  # step, length, crc32 of the data
_GLOBAL_WORDS = 2  # the step rescued plus one (0, as the file starts: none yet), the rank that wrote it
_GLOBAL_BYTES = _GLOBAL_WORDS * _WORD.size + MESSAGE_BYTES  # ... and the line that says where it went
_RANK_WORDS = 1  # status
_RANK_BYTES = _RANK_WORDS * _WORD.size + MESSAGE_BYTES + 2 * (_HEADER.size + RECORD_BYTES)


def mirror_bytes(world_size: int) -> int:
    """Bytes of the shared file the mirror of ``world_size`` ranks takes."""
    return _GLOBAL_BYTES + world_size * _RANK_BYTES


@dataclass(frozen=True, slots=True)
class PeerState:
    """What the file says of one rank: alive or not, its status, and its message."""

    rank: int
    pid: int
    alive: bool
    status: int
    message: str

    @property
    def failed(self) -> bool:
        """Gone, or raised on its own (only such a rank leaves a message): the cause, not a survivor."""
        return not self.alive or bool(self.message)

    def how(self) -> str:
        """How it failed, as a line says it."""
        if self.message:
            return f"raised {self.message}"
        if not self.alive:
            return "is gone without a word (killed by a signal: SIGKILL from the OOM killer, SIGSEGV, ...)"
        return "stopped training to save after a failure" if self.status != RUNNING else "is training"


class RankMirror:
    """This rank's view of the mirror area of the shared file (module docstring). Not thread-safe: the
    training thread alone writes its records."""

    def __init__(self, fd: int, offset: int, rank: int, world_size: int, pids: list[int]) -> None:
        self._fd = fd
        self._offset = offset
        self.rank = rank
        self.world_size = world_size
        self.pids = list(pids)
        self._written = 0  # records written by this rank; the next goes to buffer _written % 2
        self._owned = False

    @classmethod
    def alone(cls) -> RankMirror:
        """The mirror of a run of one process: no one else reads it, but the rescue then works the same way (its
        copy of this rank's state at the last step boundary). An unlinked file; :meth:`close` closes it."""
        fd, name = tempfile.mkstemp(prefix="ckptbus-mirror-", dir=shared_memory_dir())
        os.unlink(name)
        os.ftruncate(fd, mirror_bytes(1))
        mirror = cls(fd, 0, 0, 1, [os.getpid()])
        mirror._owned = True
        return mirror

    def close(self) -> None:
        """Close the file if this mirror opened it (:meth:`alone`); the votes' file is closed with the votes."""
        if self._owned and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @classmethod
    def on(cls, votes: SharedVotes) -> RankMirror:
        """The mirror in the extra bytes of ``votes`` (opened with :func:`mirror_bytes` of room), which from now
        on also stop waiting for a rank that says it failed."""
        mirror = cls(votes.fd, votes.extra_offset, votes.rank, votes.world_size, votes.pids)
        votes.peer_failure = mirror.failure_of
        return mirror

    # -- this rank's records --------------------------------------------------

    def record(self, step: int, data: bytes) -> None:
        """Copy this rank's small state of ``step`` (at its step boundary) into the buffer that does not hold
        the newest record; the header goes last, so a death mid-write leaves the other buffer whole."""
        if len(data) > RECORD_BYTES:
            raise ValueError(f"a rank's small state is {len(data)} bytes; the mirror holds {RECORD_BYTES}")
        at = self._record_offset(self.rank, self._written % 2)
        os.pwrite(self._fd, _HEADER.pack(-1, 0, 0), at)
        os.pwrite(self._fd, data, at + _HEADER.size)
        os.pwrite(self._fd, _HEADER.pack(step, len(data), zlib.crc32(data)), at)
        self._written += 1

    def mark(self, status: int, message: str = "") -> None:
        """Say how this rank stands (``FAILED`` with its exception, ``RESCUING``), for the others to read."""
        raw = message.encode("utf-8", "replace")[: MESSAGE_BYTES - 1]
        base = self._rank_offset(self.rank)
        os.pwrite(self._fd, raw + b"\0" * (MESSAGE_BYTES - len(raw)), base + _RANK_WORDS * _WORD.size)
        self._write_word(base, status)

    # -- what the others left -------------------------------------------------

    def state_of(self, rank: int, step: int) -> bytes | None:
        """Rank ``rank``'s small state of ``step``, if one of its buffers holds it whole."""
        for buffer in (0, 1):
            at = self._record_offset(rank, buffer)
            tagged, length, crc = _HEADER.unpack(os.pread(self._fd, _HEADER.size, at))
            if tagged != step or not 0 <= length <= RECORD_BYTES:
                continue
            data = os.pread(self._fd, length, at + _HEADER.size)
            if len(data) == length and zlib.crc32(data) == crc:
                return data
        return None

    def peer(self, rank: int) -> PeerState:
        base = self._rank_offset(rank)
        status = self._read_word(base)
        raw = os.pread(self._fd, MESSAGE_BYTES, base + _RANK_WORDS * _WORD.size)
        message = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        alive = rank == self.rank or process_exists(self.pids[rank])
        return PeerState(rank, self.pids[rank], alive, status, message)

    def peers(self) -> list[PeerState]:
        return [self.peer(r) for r in range(self.world_size)]

    def failure_of(self, rank: int) -> str | None:
        """Why rank ``rank`` will never vote again (it raised, and says so), or None (the votes watch its
        process themselves)."""
        state = self.peer(rank)
        return f"rank {rank} (pid {state.pid}) {state.how()}" if state.status != RUNNING else None

    # -- the rescue's outcome ---------------------------------------------------

    def rescued(self) -> tuple[int, int, str] | None:
        """(step, rank that wrote it, the line that says where) once a rescue was recorded, else None."""
        step, by = self._read_word(self._offset) - 1, self._read_word(self._offset + _WORD.size)
        if step < 0:
            return None
        raw = os.pread(self._fd, MESSAGE_BYTES, self._offset + _GLOBAL_WORDS * _WORD.size)
        return step, by, raw.split(b"\0", 1)[0].decode("utf-8", "replace")

    def record_rescue(self, step: int, line: str) -> None:
        """Record that this rank wrote (or gave up) the rescue of ``step``; ``line`` says what happened."""
        self._write_global(step, self.rank, line)

    def try_claim(self) -> bool:
        """Take the writer's lock if no other rank holds it (released by :meth:`release`, or by the kernel when
        this process dies)."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def wait_claim(self, until: float) -> bool:
        """Take the writer's lock, waiting until ``time.monotonic()`` reaches ``until``; False on time out."""
        sleep = 0.005
        while not self.try_claim():
            if time.monotonic() >= until:
                return False
            time.sleep(sleep)
            sleep = min(0.1, sleep * 2)
        return True

    # -- layout ---------------------------------------------------------------

    def _rank_offset(self, rank: int) -> int:
        return self._offset + _GLOBAL_BYTES + rank * _RANK_BYTES

    def _record_offset(self, rank: int, buffer: int) -> int:
        records = self._rank_offset(rank) + _RANK_WORDS * _WORD.size + MESSAGE_BYTES
        return records + buffer * (_HEADER.size + RECORD_BYTES)

    def _write_global(self, step: int, by: int, line: str) -> None:
        raw = line.encode("utf-8", "replace")[: MESSAGE_BYTES - 1]
        os.pwrite(self._fd, raw + b"\0" * (MESSAGE_BYTES - len(raw)), self._offset + _GLOBAL_WORDS * _WORD.size)
        os.pwrite(self._fd, _WORD.pack(by), self._offset + _WORD.size)
        os.pwrite(self._fd, _WORD.pack(step + 1), self._offset)  # last: readers trust the line once they see it

    def _read_word(self, at: int) -> int:
        return int(_WORD.unpack(os.pread(self._fd, _WORD.size, at))[0])

    def _write_word(self, at: int, value: int) -> None:
        os.pwrite(self._fd, _WORD.pack(value), at)


__all__ = [
    "FAILED",
    "RECORD_BYTES",
    "RESCUING",
    "RUNNING",
    "SETTLING",
    "UNABLE",
    "PeerState",
    "RankMirror",
    "mirror_bytes",
]
