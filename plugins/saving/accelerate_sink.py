"""The accelerate sink: every rank saves the agreed step into staging; the main process commits.

It keeps the sink contract (ckptbus/_sink.py): the runtime decides and
publishes; this module only writes and reports the outcome. The sequence
for one save (all on the training thread of every rank):

1. (the runtime has published ``save_started``)
2. The committing process (the main process; with ``save_on_each_node`` the
   main process of each node) creates the staging directory; a collective
   tells every rank whether that worked (and doubles as the barrier).
3. Every rank writes. A full save under replicated state (one process,
   DDP) is written by ckptbus itself, in the files and formats
   ``accelerator.save_state`` writes: the shared files (model, optimizer,
   scheduler, ...) are spread over the ranks by bytes and written in
   parallel, each digested as it is written (plugins/saving/file_writer.py),
   and every rank writes its own RNG state. Elsewhere (DeepSpeed, FSDP, a
   ``save_state`` pre-hook) every rank calls ``accelerator.save_state``; a
   weights save calls ``accelerator.save_model`` on every rank: accelerate
   gathers inside them, so a main-process-only call would hang.
4. A collective counts failures: if any rank failed, every rank returns
   :class:`~ckptbus._sink.NotWritten` with that rank's message and the
   staging directory is removed.
5. The committer finalizes (ckptbus/_commit.py: modes, fsync, the manifest
   last, the rename to ``checkpoint-<step>``); a last collective tells every
   rank whether the commit worked, and every rank returns
   :class:`~ckptbus._sink.Written` (or ``NotWritten``).

An asynchronous full save (``dynamic_checkpoint.async_save``, :meth:`AccelerateSink.begin`) replaces step 3
with a snapshot into host memory and a writer thread per rank (plugins/async_writer.py); at each later step
boundary :meth:`AccelerateSink.poll` asks every rank, in one collective on the training thread, whether its
writer ended, and once all have, agrees on failures and commits as in steps 4 and 5. The writer thread runs no
collective. Every collective goes through the run's ``Ranks`` (plugins/distributed.py).
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator

from ckptbus import SetupError
from ckptbus._commit import RenameCommit
from ckptbus._coordinator import Decision
from ckptbus._layout import clean_leftovers
from ckptbus._sink import NotWritten, Outcome, SaveMode, SaveRecord, Written

from ..distributed import Ranks, StageFailed
from .async_writer import HostSnapshot, WriteJob, async_unsupported, plan_writers
from .errors import describe_write_error, free_bytes
from .rescue_writer import encode_rank_state, write_alone
from .torch_save_crc import torch_save_crc32
from .weights import save_weights
from .writer_process import ProcessWriteJob

logger = logging.getLogger("ckptbus")


@dataclass(slots=True)
class _Save:
    """One save's record, where it goes, what this rank digested, and when it started."""

    record: SaveRecord
    commit: RenameCommit
    started: float = field(default_factory=time.perf_counter)
    digests: dict[str, str] = field(default_factory=dict)
    """The digests of the files this rank wrote itself, taken as it wrote them."""


@dataclass(slots=True)
class _InFlight:
    """An asynchronous save whose writers run: the save, this rank's writer, and how long the snapshot held training."""

    save: _Save
    job: WriteJob | ProcessWriteJob
    stall: float
    hooks: list[Any] = field(default_factory=list)
    """Step pre-hooks that hold ``optimizer.step()`` until the deferred copies are made."""

    def remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()


class AccelerateSink:
    """Writes agreed saves with accelerate (a :class:`~ckptbus._sink.Sink`). See the module docstring.

    ``model``: the model a weights save writes (default: the one model
    prepared by accelerate). ``async_save``: full saves are asynchronous
    where the run allows it (else synchronous, with one warning at start).
    """

    def __init__(
        self,
        accelerator: Accelerator,
        *,
        model: torch.nn.Module | None = None,
        async_save: bool = False,
        torch_save_crc32: bool = False,
        async_writer: str = "thread",
    ) -> None:
        self.accelerator = accelerator
        self.async_save = async_save
        self.async_writer = async_writer
        self.torch_save_crc32 = torch_save_crc32
        self.ranks = Ranks()
        self.output_dir = Path(".")
        self._model = model
        self._snapshot = HostSnapshot()
        self._async: _InFlight | None = None
        self.copy_wait_seconds = 0.0
        """How long ``optimizer.step()`` waited for the deferred copies of asynchronous saves, in all (a diagnostic)."""
        self.parallel_writers = True
        """Spread the shared files of a full save over the ranks (False: the main process writes them, as
        ``save_state`` does). Only benchmarks turn it off, to measure what it brings."""
        self.digests: Literal["written", "read back", "none"] = "written"
        """How the manifest's digests are taken: as each file is written (files ckptbus did not write itself are
        read back by the committer); or all read back; or none. Only benchmarks change it, to measure it."""
        self.hash_wait_seconds = 0.0
        """How long synchronous saves waited for their digests, in all (a diagnostic the benchmarks read)."""
        self._between_steps = False  # an optimizer stepped since the last step boundary (see rescue_unsupported)
        self._step_hooks: list[Any] = []
        self._abandoned: WriteJob | ProcessWriteJob | None = None

    # -- the contract ---------------------------------------------------------

    def start(self, ranks: Ranks, output_dir: Path) -> None:
        """Once the runtime started: say (once) why saves stay synchronous, remove what interrupted saves left."""
        self.ranks, self.output_dir = ranks, output_dir
        if self.async_save and ranks.is_main:
            why = self.async_unsupported()
            if why is not None:
                logger.warning("ckptbus: dynamic_checkpoint.async_save: %s; full saves stay synchronous", why)
            elif self.async_writer == "process" and self.has_cuda_state():
                logger.warning(
                    "ckptbus: async_writer: process reads CPU tensors only; a thread writes this run's saves"
                )
        if ranks.committer:
            for leftover in clean_leftovers(output_dir):
                logger.warning("ckptbus: removed %s, left by a save that was interrupted", leftover)
        for hook in self._step_hooks:
            hook.remove()

        def stepped(*_: Any) -> None:
            self._between_steps = True

        # On the torch optimizer inside accelerate's wrapper: its step() runs only when gradients are synced. Only
        # where a rank can rescue alone (replicated state): DeepSpeed's optimizers are not torch optimizers.
        inner = [getattr(o, "optimizer", o) for o in self._optimizers()] if self.async_unsupported() is None else []
        self._step_hooks = [o.register_step_pre_hook(stepped) for o in inner if hasattr(o, "register_step_pre_hook")]

    def plan(self, decision: Decision) -> tuple[Decision, SaveMode]:
        """Full saves are asynchronous with ``async_save`` where the run allows it (checked at each save: a
        ``save_state`` pre-hook registered after start-up makes the save synchronous); the rest synchronous."""
        asynchronous = decision.kind == "full" and self.async_save and self.async_unsupported() is None
        return decision, "async" if asynchronous else "sync"

    def execute(self, record: SaveRecord) -> Outcome:
        """Save ``record.step`` on every rank and commit it. Call on every rank."""
        save = _Save(record, RenameCommit(self.output_dir, record.step))
        writes = self._writes() if record.kind == "full" else None
        try:
            self.ranks.agree("creating the staging directory", self._create(save))
            write_started = self.ranks.agree("writing", lambda: self._write(save, writes))
        except StageFailed as failure:
            return self._fail(save, str(failure))
        # The agreement after "writing" waited for every rank, so these times are the slowest rank's; the fsync
        # inside the commit is part of the write, and training is held for all of it.
        return self._commit(save, stall_before=write_started - save.started, write_before=0.0, since=write_started)

    def begin(self, record: SaveRecord) -> NotWritten | None:
        """Start an asynchronous full save: staging, then a snapshot on every rank; the writers run on.

        Returns the agreed failure if the staging directory or a snapshot failed on any rank, else None: the
        save is then in flight until :meth:`poll` reports its outcome.
        """
        if self._async is not None:
            raise RuntimeError(f"an asynchronous save of step {self._async.save.record.step} is still in flight")
        save = _Save(record, RenameCommit(self.output_dir, record.step))
        writes = self._writes()
        # A forked writer reads the live state through copy-on-write memory: nothing to copy (CPU tensors only).
        forked = self.async_writer == "process" and not self.has_cuda_state()
        try:
            self.ranks.agree("creating the staging directory", self._create(save))
            snapshot = self.ranks.agree(
                "copying the state to host memory",
                lambda: self._snapshot.take(self.accelerator, writes=writes, copy=not forked),
            )
        except StageFailed as failure:
            return self._fail(save, str(failure))
        job = (ProcessWriteJob if forked else WriteJob)(
            snapshot, save.commit.directory, torch_save_crc32=self.torch_save_crc32, digest=self.digests == "written"
        )
        flight = _InFlight(save, job, stall=0.0)
        limit = self.ranks.wait_limit()  # read once: the hook runs at every optimizer step of the save

        def hold_step(*_: Any) -> None:
            """Optimizer step pre-hook: the state may change only once the writer copied it."""
            waited = job.wait_copied(limit)
            flight.stall += waited
            self.copy_wait_seconds += waited

        for optimizer in [] if forked else self.accelerator._optimizers:
            # On the torch optimizer inside accelerate's wrapper: its step() is the one that changes the state.
            inner = getattr(optimizer, "optimizer", optimizer)
            flight.hooks.append(inner.register_step_pre_hook(hold_step))
        job.start()
        flight.stall = time.perf_counter() - save.started
        self._async = flight
        return None

    def poll(self, *, wait: bool) -> Outcome | None:
        """At a step boundary while a save is in flight: its outcome once every rank's writer ended, else None.

        One collective when some writer still runs; when all ended, the failure of any rank is agreed or the
        checkpoint is committed. ``wait``: wait for this rank's writer first (before a stop, at the end), so
        this call settles the save.
        """
        flight = self._async
        if flight is None:
            return None
        if wait:
            self._wait_for(flight)
        polled = time.perf_counter()
        ended = flight.job.done.is_set()
        running, stall_ms, write_ms = self.ranks.max(
            [int(not ended), round(flight.stall * 1000), round(flight.job.seconds * 1000) if ended else 0]
        )
        if running:
            return None
        self._async = None
        flight.remove_hooks()  # (the writer ended, so they would not wait anyway)
        try:
            self.ranks.agree("writing", lambda: _raise_if(flight.job.error))
        except StageFailed as failure:
            return self._fail(flight.save, str(failure).replace(": OSError: ", ": ", 1))
        flight.save.digests = flight.job.digests
        return self._commit(flight.save, stall_before=stall_ms / 1000, write_before=write_ms / 1000, since=polled)

    def _wait_for(self, flight: _InFlight) -> None:
        """Wait for this rank's writer, saying what for once a minute; at :meth:`Ranks.wait_limit` give it up
        (the save then fails, agreed by every rank, instead of a collective timing out on the others)."""
        job, step, limit = flight.job, flight.save.record.step, self.ranks.wait_limit()
        started = time.monotonic()
        while not job.wait(min(60.0, max(0.0, limit - (time.monotonic() - started)))):
            waited = time.monotonic() - started
            if waited >= limit:
                job.give_up(f"{job.who} did not finish the save of step {step} within {limit:.0f} s; it was given up")
                return
            logger.warning(
                "ckptbus: rank %d: waiting %.0f s so far for %s (step %d)", self.ranks.rank, waited, job.who, step
            )

    def abandon(self) -> None:
        """Forget the save in flight without any collective (error paths): its staging is never committed (the
        next start removes it)."""
        flight, self._async = self._async, None
        if flight is not None:
            flight.remove_hooks()
            self._abandoned = flight.job  # a rescue of the same step waits for it (see rescue)

    # -- a rank failed (plugins/rescue.py) --------------------------------------

    def rank_state(self) -> bytes:
        """This rank's RNG states at this step boundary (plugins/saving/rescue_writer.py)."""
        self._between_steps = False
        return encode_rank_state(self.accelerator)

    def rescue_unsupported(self) -> str | None:
        """Why this rank cannot write a checkpoint of its last step boundary alone (None: it can)."""
        why = self.async_unsupported()
        if why is not None:
            return f"{why}: the state is sharded over the ranks, and a failed rank's part is gone with it"
        if self._between_steps:
            return "it failed after an optimizer step and before the step boundary: its state is of neither step"
        return None

    def rescue(self, record: SaveRecord, rank_states: Mapping[int, bytes]) -> Outcome:
        """Write and commit ``record`` alone (no collective): replicated state from here, RNG states of every rank
        from ``rank_states``, into a staging directory of its own (the writers of an abandoned save of the same
        step may still write into theirs)."""
        job, self._abandoned = self._abandoned, None
        if job is not None:  # (it writes elsewhere; stopping it leaves the disk and the CPU to the rescue)
            job.give_up("a rank failed; the surviving ranks save on their own")
        commit = RenameCommit(self.output_dir, record.step, rescue=True)  # (not where abandoned writers write)
        started = time.perf_counter()
        try:
            commit.create()
            digests = write_alone(self.accelerator, self.model(), commit.directory, record.kind, rank_states)

            def timings() -> dict[str, float]:
                seconds = round(time.perf_counter() - started, 3)
                return {"seconds": seconds, "stall_seconds": seconds, "write_seconds": seconds}

            manifest = commit.finalize(record, timings, digests, read_back=True)
        except Exception as exc:
            commit.discard()
            return NotWritten(describe_write_error(exc, commit.directory) or f"{type(exc).__name__}: {exc}")
        return Written(commit.final, manifest.bytes, manifest.stall_seconds, manifest.write_seconds)

    def _optimizers(self) -> list[Any]:
        return list(getattr(self.accelerator, "_optimizers", []))

    # -- what the adapter and benchmarks read ---------------------------------------

    def async_unsupported(self) -> str | None:
        """Why full saves of this run cannot be asynchronous (None if they can)."""
        return async_unsupported(self.accelerator)

    def has_cuda_state(self) -> bool:
        """Whether a model of the run holds CUDA tensors (a forked writer cannot read them)."""
        return any(p.is_cuda for model in self.accelerator._models for p in model.parameters())

    def model(self) -> torch.nn.Module:
        """The model a weights save writes: the one given, or the one model prepared by accelerate."""
        if self._model is not None:
            return self._model
        models: list[Any] = list(getattr(self.accelerator, "_models", []))
        if len(models) != 1:
            raise SetupError(
                f"a weights checkpoint needs to know which model to save, and accelerate has {len(models)} "
                "prepared models; pass model=... to DynamicCheckpoint"
            )
        model: torch.nn.Module = models[0]
        return model

    # -- one save, start to end -------------------------------------------------

    def _create(self, save: _Save) -> Any:
        return save.commit.create if self.ranks.committer else _nothing

    def _fail(self, save: _Save, error: str) -> NotWritten:
        if self.ranks.committer:
            save.commit.discard()
        return NotWritten(error)

    def _commit(self, save: _Save, *, stall_before: float, write_before: float, since: float) -> Outcome:
        """Finalize on the committer, agreed by every rank. Training is held from ``since``, on top of
        ``stall_before`` seconds held earlier; ``write_before`` seconds of writing happened before ``since``."""
        digests = {name: d for part in self.ranks.gather(save.digests) for name, d in part.items()}

        def timings_with_fsync() -> dict[str, float]:
            now = time.perf_counter()
            return {
                "seconds": round(now - save.started, 3),
                "stall_seconds": round(stall_before + now - since, 3),
                "write_seconds": round(write_before + now - since, 3),
            }

        def finalize() -> Written:
            if not self.ranks.committer:
                return Written(save.commit.final)
            manifest = save.commit.finalize(save.record, timings_with_fsync, digests, read_back=self.digests != "none")
            return Written(save.commit.final, manifest.bytes, manifest.stall_seconds, manifest.write_seconds)

        try:
            return self.ranks.agree("committing", finalize)
        except StageFailed as failure:
            return self._fail(save, str(failure))

    # -- the stages ---------------------------------------------------------

    def _write(self, save: _Save, writes: set[str] | None) -> float:
        """Write this rank's part of the save (its digests into ``save``); return when writing started."""
        started = time.perf_counter()
        staging = save.commit.directory
        free_before = free_bytes(staging)  # (after a failure the failed writes have filled the disk: say both)
        try:
            if save.record.kind == "full" and writes is not None:
                snapshot = self._snapshot.take(self.accelerator, writes=writes, copy=False)
                job = WriteJob(
                    snapshot, staging, torch_save_crc32=self.torch_save_crc32, digest=self.digests == "written"
                )
                try:
                    job.write()
                finally:
                    self.hash_wait_seconds += job.hash_wait_seconds
                save.digests = job.digests
            elif (
                save.record.kind == "full"
            ):  # a run ckptbus cannot write itself (DeepSpeed, FSDP, a save_state pre-hook)
                with torch_save_crc32(self.torch_save_crc32):  # see plugins/saving/torch_save_crc.py
                    self.accelerator.save_state(str(staging))
            else:
                save_weights(self.accelerator, self.model(), staging, is_committer=self.ranks.committer)
        except Exception as exc:  # a full disk or a quota is said as such (plugins/saving/errors.py)
            room = describe_write_error(exc, staging, self._bytes_of(writes), free_before=free_before)
            if room is None:
                raise
            raise OSError(room) from exc
        return started

    def _bytes_of(self, writes: set[str] | None) -> int | None:
        """About how many bytes this rank's shared files of a full save hold (None where ckptbus does not know)."""
        if writes is None:
            return None
        sizes = HostSnapshot.shared_sizes(self.accelerator)
        return sum(size for name, size in sizes.items() if name in writes) or None

    def _writes(self) -> set[str] | None:
        """Collective: the files of a full save this rank writes, or None where ckptbus does not write them itself.

        Under replicated state (one process, DDP) every rank holds the same
        model and optimizer state, so the shared files are spread over the
        ranks by bytes (:func:`plan_writers`) and written in parallel. With
        ``save_on_each_node`` the committer of each machine writes them
        all, as accelerate does. The ranks check that they made the same plan
        (one small collective) and fall back to that rule otherwise.
        """
        if self.async_unsupported() is not None:
            return None
        sizes = HostSnapshot.shared_sizes(self.accelerator)
        ranks = self.ranks
        if ranks.save_on_each_node:
            return set(sizes) if ranks.committer else set()
        plan = plan_writers(sizes, ranks.world_size if self.parallel_writers else 1)
        if not ranks.all_equal(zlib.crc32(repr(sorted(plan.items())).encode())):
            logger.warning("ckptbus: the ranks hold different state sizes; the main process writes the shared files")
            return set(sizes) if ranks.committer else set()
        return {name for name, writer in plan.items() if writer == ranks.rank}


def _nothing() -> None:
    """The stage of a rank that has nothing to do in it (it still takes part in the agreement)."""


def _raise_if(error: str | None) -> None:
    if error is not None:
        raise OSError(error)
