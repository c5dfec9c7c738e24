"""Everything that crosses ranks: the vote exchange, the :class:`Ranks` of a run (who commits, and the
stage-shaped collectives sinks and the runtime use), a name from rank 0, the choice of vote channel, the
world-size check and the ``output_dir`` sharing probe. No other module calls ``torch.distributed``.

Every function here is a collective unless it says otherwise: every rank calls it, in the same order, on the
training thread. With one process nothing is exchanged.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import torch
import torch.distributed as dist

from ckptbus import SetupError
from ckptbus._coordinator import VOTE_LENGTH
from ckptbus._names import PROBE_PREFIX

from .rank_mirror import mirror_bytes
from .shared_votes import SharedVotes

logger = logging.getLogger("ckptbus")

REASON_BYTES = 512
"""How much of a failed rank's error message travels to every rank (UTF-8 bytes, one int each)."""


class TorchExchange:
    """Element-wise max of a small int vector over all ranks with ``torch.distributed``.

    The tensor lives where the backend wants it (CUDA for NCCL, CPU for
    gloo). With one process nothing is exchanged.
    """

    def __init__(self, accelerator: Any) -> None:
        self.world_size = int(accelerator.num_processes)
        self.device = torch.device("cpu")
        self.group: Any = None  # the default process group
        if self.world_size > 1 and dist.get_backend() == "nccl":
            self.device = accelerator.device

    @classmethod
    def of(cls, world_size: int, device: torch.device, group: Any = None) -> TorchExchange:
        """The exchange of a run with ``world_size`` ranks whose tensors for collectives live on ``device``."""
        exchange = cls.__new__(cls)
        exchange.world_size = world_size
        exchange.device = device
        exchange.group = group
        return exchange

    def on_host(self) -> TorchExchange:
        """An exchange for per-step votes that never waits for the GPU. Collective: every rank calls it.

        Over NCCL the vote lives on the GPU, and reading it makes the host
        wait for all the GPU work queued before it, at every step. A gloo
        group over the same ranks keeps the vote on the host. Where the
        backend is gloo already (or gloo is missing) this exchange is returned.
        """
        if self.world_size == 1 or self.device.type == "cpu" or not dist.is_gloo_available():
            return self
        return TorchExchange.of(self.world_size, torch.device("cpu"), dist.new_group(backend="gloo"))

    def __call__(self, vote: Sequence[int]) -> list[int]:
        return self.start(vote).wait()

    def start(self, vote: Sequence[int]) -> _StartedVote:
        """Start the exchange without waiting for it (``async_op``); ``wait()`` on the result reads it."""
        if self.world_size == 1:
            return _StartedVote(None, list(vote))
        tensor = torch.tensor(list(vote), dtype=torch.int64, device=self.device)
        return _StartedVote(dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group, async_op=True), tensor)

    def broadcast_name(self, name: str) -> str:
        """Rank 0's ``name`` on every rank (what the others pass is ignored)."""
        if self.world_size == 1:
            return name
        box = [name]
        dist.broadcast_object_list(box, src=0)
        return str(box[0])

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable, small), in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self.group)
        return gathered

    def timeout(self) -> timedelta:
        """How long a collective of the default process group waits (torch's default of 30 min if unknown)."""
        try:
            group = dist.distributed_c10d._get_default_group()
            backend = group._get_backend(torch.device("cuda" if dist.get_backend() == "nccl" else "cpu"))
            timeout = backend.options._timeout  # not public API: any surprise falls back to the default
            if isinstance(timeout, timedelta) and timeout.total_seconds() > 0:
                return timeout
        except Exception:
            pass
        return timedelta(minutes=30)


class _StartedVote:
    """An all_reduce in flight (or, with one process, the vote itself)."""

    __slots__ = ("_result", "_work")

    def __init__(self, work: Any, result: torch.Tensor | list[int]) -> None:
        self._work = work
        self._result = result

    def wait(self) -> list[int]:
        if self._work is not None:
            self._work.wait()
            self._work = None
        result = self._result
        return [int(x) for x in (result.tolist() if isinstance(result, torch.Tensor) else result)]


def check_world(num_processes: int, *, seen_by: str, fix: str, detail: str = "") -> None:
    """Not a collective. Refuse a run where the framework and torch.distributed disagree on the number of ranks.

    That happens with ``accelerate launch --multi_gpu`` on a machine without
    a GPU when the script does not ask for the CPU: every rank then believes
    it is the only (main) process and all of them would write the same
    checkpoint. ``seen_by`` names the framework's view (``detail`` adds to it), ``fix`` what to do.
    """
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        if world != num_processes:
            raise SetupError(
                f"torch.distributed has {world} ranks but {seen_by} sees {num_processes} process(es){detail}. On a "
                f"machine without a GPU, {fix} so that every rank takes part."
            )


def uses_nccl() -> bool:
    """Not a collective. Whether the default process group runs over NCCL (its tensors must be on the GPU)."""
    return dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl"


T = TypeVar("T")


class Collective(Protocol):
    """A run's collective as :class:`TorchExchange` offers it (a test's exchange between threads offers the same)."""

    world_size: int

    def __call__(self, vote: Sequence[int]) -> list[int]: ...

    def start(self, vote: Sequence[int]) -> Any: ...

    def all_gather(self, obj: Any) -> list[Any]: ...

    def broadcast_name(self, name: str) -> str: ...

    def on_host(self) -> Collective: ...

    def timeout(self) -> timedelta: ...


class StageFailed(Exception):
    """A stage of a save failed on some rank, and every rank knows it (raised by :meth:`Ranks.agree` on every rank).

    ``str(exc)`` names the stage, the rank and its error: the words a ``save_failed`` event carries.
    """


@dataclass(frozen=True, slots=True, kw_only=True)
class Ranks:
    """The ranks of one run, as this rank sees them: who it is, who commits, and the collectives stages use.

    Handed by the runtime to its sink: a sink asks this object, never the
    runtime, whether it commits and whether a stage worked everywhere.
    Every method is a collective: every rank calls it, in the same order,
    on the training thread (with one process nothing is exchanged).
    """

    collective: Collective | None = None
    """The run's collective; None for one process (and before a Trainer's ranks are known)."""
    rank: int = 0
    local_rank: int = 0
    save_on_each_node: bool = False
    """One copy of each checkpoint per machine (accelerate's ``save_on_each_node``): a committer per machine."""

    @classmethod
    def of(cls, collective: Collective, *, rank: int, local_rank: int, save_on_each_node: bool) -> Ranks:
        """The ranks of a run with ``collective`` (its ``world_size`` ranks), seen from ``rank``."""
        return cls(
            collective=collective if collective.world_size > 1 else None,
            rank=rank,
            local_rank=local_rank,
            save_on_each_node=save_on_each_node,
        )

    @property
    def world_size(self) -> int:
        return self.collective.world_size if self.collective is not None else 1

    @property
    def is_main(self) -> bool:
        """Rank 0: logs once per run, writes the event log."""
        return self.rank == 0

    @property
    def committer(self) -> bool:
        """Whether this rank is the main process of its filesystem: it locks ``output_dir``, resolves a resume,
        creates staging, commits and rotates. The main process; with ``save_on_each_node`` the main process of
        each machine (each has its own copy). The one place this rule is written."""
        return self.rank == 0 or (self.save_on_each_node and self.local_rank == 0)

    def wait_limit(self) -> float:
        """Seconds this rank may wait for work of its own (its writer) at a point where the other ranks may
        already wait in a collective: a minute less than the process group's timeout (30 minutes unless the run
        set another), so this rank gives up, says why, and joins them before their collective fails."""
        timeout = self.collective.timeout() if self.collective is not None else timedelta(minutes=30)
        return max(60.0, timeout.total_seconds() - 60.0)

    def max(self, vote: Sequence[int]) -> list[int]:
        """Element-wise maximum of ``vote`` over the ranks."""
        return self.collective(vote) if self.collective is not None else list(vote)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's small picklable ``obj``, in rank order."""
        return self.collective.all_gather(obj) if self.collective is not None else [obj]

    def all_equal(self, value: int) -> bool:
        """Whether every rank passed the same ``value`` (one collective)."""
        highest, minus_lowest = self.max([value, -value])
        return highest == -minus_lowest

    def first_refusal(self, refusal: str | None) -> str | None:
        """This rank's ``refusal``, else the lowest other rank's, else None (a refusal anywhere is one everywhere)."""
        others = [r for r in self.gather(refusal) if r is not None]
        return refusal if refusal is not None else (others[0] if others else None)

    def agree(self, what: str, stage: Callable[[], T]) -> T:
        """Run ``stage`` here, then agree with every rank that it worked; return what it returned on this rank.

        Raises :class:`StageFailed` on every rank when it raised on any. The
        collective is also the barrier between stages. When some rank
        failed, a second collective carries the message of the highest
        failed rank to every rank, so the ``save_failed`` event on the main
        process (and the reply to a waiting ``ckptbus request``) says what
        went wrong; a rank that failed itself reports its own error.
        """
        error: str | None = None
        value: T | None = None
        try:
            value = stage()
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            logger.error("ckptbus: rank %d: %s failed: %s", self.rank, what, error, exc_info=exc)
        failed_rank = self.max([self.rank + 1 if error is not None else 0])[0] - 1
        if failed_rank < 0:
            # The stage returned normally here (its value may be None: a stage that returns nothing).
            return cast(T, value)
        message = f"{what} failed on rank {failed_rank}: {error}".encode()[:REASON_BYTES]
        vote = [0] * REASON_BYTES
        if self.rank == failed_rank:
            vote[: len(message)] = message
        shared = bytes(b for b in self.max(vote) if b).decode("utf-8", "replace")
        raise StageFailed(
            shared if error is None or self.rank == failed_rank else f"{what} failed on rank {self.rank}: {error}"
        )


def open_votes(
    rank: int, collective: Collective, length: int = VOTE_LENGTH
) -> tuple[SharedVotes | None, SharedVotes | Collective]:
    """The Coordinator's votes of a run: (the shared votes, if any, to close at the end; the exchange to vote with).

    ``length``: ints in one vote (the coordinator's ``vote_length``). Ranks
    on one machine vote through shared memory (plugins/shared_votes.py);
    otherwise through ``collective`` kept off the GPU
    (:meth:`TorchExchange.on_host`). The main process logs which.
    """
    # With room for the ranks' mirror (plugins/rank_mirror.py): what survivors need of a rank that dies.
    shared = SharedVotes.open(
        rank, collective.world_size, length, collective, extra_bytes=mirror_bytes(collective.world_size)
    )
    if collective.world_size > 1 and rank == 0:
        channel = "shared memory" if shared is not None else "collective"
        logger.info("ckptbus: the %d ranks vote through %s", collective.world_size, channel)
    return shared, shared or collective.on_host()


def check_output_dir_layout(
    output_dir: Path,
    exchange: Collective,
    *,
    is_main: bool,
    is_local_main: bool,
    save_on_each_node: bool,
) -> None:
    """Refuse, at start-up, an ``output_dir`` whose sharing between machines does not match ``save_on_each_node``.

    With several machines a checkpoint has one committer per filesystem
    (docs/multinode.md): the main process when ``output_dir`` is shared, the
    local main process of each machine with ``save_on_each_node``. Get that
    wrong and the run only finds out at its first save, hours in:

    - ``save_on_each_node`` with a shared ``output_dir``: two committers rename
      the same staging directory;
    - a per-machine ``output_dir`` without it: the ranks of other machines find
      no staging directory to write their RNG state into, and every save fails.

    So the main process writes a probe file into ``output_dir`` and the local
    main process of every other machine looks for it. Single-machine runs pay
    one small collective and write nothing. Raises :class:`~ckptbus.SetupError`
    on every rank on a mismatch.
    """
    if exchange.world_size == 1:
        return
    other_machine = is_local_main and not is_main
    if not exchange([int(other_machine)])[0]:
        return  # one machine: nothing to compare
    probe = output_dir / exchange.broadcast_name(PROBE_PREFIX + secrets.token_hex(8) if is_main else "")
    created = 1
    if is_main:
        try:
            probe.touch()
        except OSError:
            created = 0
    seen = not_seen = 0
    if exchange([1 - created])[0] == 0 and other_machine:  # (also the barrier: the probe exists from here on)
        seen, not_seen = (1, 0) if probe.exists() else (0, 1)
    any_seen, any_not_seen = exchange([seen, not_seen])
    if is_main:
        with contextlib.suppress(OSError):
            probe.unlink()
    if save_on_each_node and any_seen:
        raise SetupError(
            f"save_on_each_node is true but output_dir {str(output_dir)!r} is shared between machines (another "
            "machine sees the files the main process writes there): two committers would rename the same staging "
            "directory. Set save_on_each_node: false, or give every machine an output_dir on its own disk."
        )
    if not save_on_each_node and any_not_seen:
        raise SetupError(
            f"output_dir {str(output_dir)!r} is not shared between machines (another machine does not see the "
            "files the main process writes there), and save_on_each_node is false: the other machines' ranks would "
            "find no staging directory and every save would fail. Use a directory on a shared filesystem, or set "
            "save_on_each_node: true to keep one copy of each checkpoint per machine."
        )
