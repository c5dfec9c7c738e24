"""The accelerate sink: every rank saves the agreed step into staging; the main process commits.

The sequence for one save (all on the training thread of every rank):

1. ``save_started`` is published.
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
4. A collective counts failures: if any rank failed, all ranks report
   ``save_failed`` with that rank's message and the staging directory is
   removed; training goes on (or stops, with ``on_save_failure: stop``).
5. The committer fsyncs, writes the manifest last, renames staging to
   ``checkpoint-<step>``; a last collective tells every rank whether the
   commit worked. Only then are old checkpoints rotated out and
   ``save_completed`` (or ``save_failed``) published.

An asynchronous full save (``dynamic_checkpoint.async_save``, :meth:`AccelerateSink.begin`) replaces step 3
with a snapshot into host memory and a writer thread per rank (plugins/async_writer.py); at each later step
boundary :meth:`AccelerateSink.poll` asks every rank, in one collective on the training thread, whether its
writer ended, and once all have, agrees on failures and commits as in steps 4 and 5. The writer thread runs no
collective.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator

from ckptbus import SaveCompleted, SaveFailed, SaveStarted, SetupError
from ckptbus._coordinator import Decision
from ckptbus._layout import checkpoint_path, commit, discard, prepare_staging, staging_path, withdraw

from ..runtime import Runtime
from .async_writer import HostSnapshot, Snapshot, WriteJob, async_unsupported, plan_writers
from .errors import apply_umask_modes, describe_write_error
from .torch_save_crc import torch_save_crc32
from .weights import save_weights
from .writer_process import ProcessWriteJob

logger = logging.getLogger("ckptbus")


class _Save:
    """One save's names and progress, shared by its stages."""

    __slots__ = ("decision", "digests", "final", "renamed", "sink", "staging", "started")

    def __init__(self, sink: AccelerateSink, decision: Decision) -> None:
        self.sink = sink
        self.decision = decision
        self.final = checkpoint_path(sink.output_dir, decision.step)
        self.staging = staging_path(sink.output_dir, decision.step)
        self.digests: dict[str, str] = {}
        """The digests of the files this rank wrote itself, taken as it wrote them."""
        self.started = time.perf_counter()
        self.renamed = False

    def prepare(self) -> None:
        if self.sink.is_committer:
            prepare_staging(self.sink.output_dir, self.decision.step)


@dataclass(slots=True)
class _InFlight:
    """An asynchronous save whose writers run: the save, this rank's writer, and how long the snapshot held training."""

    save: _Save
    job: WriteJob | ProcessWriteJob
    stall: float
    hooks: list[Any] = field(default_factory=list)
    """Step pre-hooks that hold ``optimizer.step()`` until the deferred copies are made."""

    def hold_step(self, *_: Any) -> None:
        """Optimizer step pre-hook: the state may change only once the writer copied it."""
        waited = self.job.wait_copied()
        self.stall += waited
        self.save.sink.copy_wait_seconds += waited

    def remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()


class AccelerateSink:
    """Carries out a :class:`~ckptbus._coordinator.Decision` with accelerate. See the module docstring."""

    def __init__(
        self,
        accelerator: Accelerator,
        runtime: Runtime,
        *,
        model: torch.nn.Module | None = None,
        torch_save_crc32: bool = False,
        async_writer: str = "thread",
    ) -> None:
        self.accelerator = accelerator
        self.async_writer = async_writer
        self.runtime = runtime
        self.torch_save_crc32 = torch_save_crc32
        self.output_dir = runtime.output_dir
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

    def has_cuda_state(self) -> bool:
        """Whether a model of the run holds CUDA tensors (a forked writer cannot read them)."""
        return any(p.is_cuda for model in self.accelerator._models for p in model.parameters())

    @property
    def is_committer(self) -> bool:
        """Whether this process renames staging into place (one per shared filesystem)."""
        if self.accelerator.project_configuration.save_on_each_node:
            return bool(self.accelerator.is_local_main_process)
        return bool(self.accelerator.is_main_process)

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

    def execute(self, decision: Decision) -> SaveCompleted | SaveFailed:
        """Save ``decision.step`` on every rank; publish and return the outcome. Call on every rank."""
        save = self._start(decision)
        writes = self._writes() if decision.kind == "full" else None
        write_started = time.perf_counter()

        def write() -> None:
            nonlocal write_started
            write_started = time.perf_counter()
            try:
                save.digests = self._write(decision.kind, save.staging, writes)
            except Exception as exc:  # a full disk or a quota is said as such (plugins/saving/errors.py)
                room = describe_write_error(exc, save.staging)
                if room is None:
                    raise
                raise OSError(room) from exc

        for what, stage in (("creating the staging directory", save.prepare), ("writing", write)):
            error = self.runtime.agree(what, stage)
            if error is not None:
                return self._fail(save, error)
        # The agreement after "writing" waited for every rank, so these times are the slowest rank's; the fsync
        # inside commit() is part of the write, and training is held for all of it.
        return self._commit(save, stall_before=write_started - save.started, write_before=0.0, since=write_started)

    # -- asynchronous full saves ----------------------------------------------

    @property
    def in_flight(self) -> int | None:
        """The step of the asynchronous save being written, or None. The same on every rank."""
        return self._async.save.decision.step if self._async is not None else None

    def abandon(self) -> dict[str, Any] | None:
        """Forget the save in flight without any collective (error paths); return its event fields, or None.

        Its staging directory is never committed; the next start removes it.
        """
        flight, self._async = self._async, None
        if flight is None:
            return None
        flight.remove_hooks()
        return flight.save.decision.event_fields()

    def async_unsupported(self) -> str | None:
        """Why full saves of this run cannot be asynchronous (None if they can)."""
        return async_unsupported(self.accelerator)

    def begin(self, decision: Decision) -> SaveFailed | None:
        """Start an asynchronous full save: staging, then a snapshot on every rank; the writers run on.

        Returns the agreed failure if the staging directory or a snapshot failed on any rank, else None: the
        save is then in flight until :meth:`poll` commits it (or reports its failure).
        """
        if self._async is not None:
            raise RuntimeError(f"an asynchronous save of step {self.in_flight} is still in flight")
        save = self._start(decision)
        snapshot: list[Snapshot] = []

        writes = self._writes()
        # A forked writer reads the live state through copy-on-write memory: nothing to copy (CPU tensors only).
        forked = self.async_writer == "process" and not self.has_cuda_state()

        def take() -> None:
            snapshot.append(self._snapshot.take(self.accelerator, writes=writes, copy=not forked))

        for what, stage in (
            ("creating the staging directory", save.prepare),
            ("copying the state to host memory", take),
        ):
            error = self.runtime.agree(what, stage)
            if error is not None:
                return self._fail(save, error)
        job = (ProcessWriteJob if forked else WriteJob)(
            snapshot[0], save.staging, torch_save_crc32=self.torch_save_crc32, digest=self.digests == "written"
        )
        flight = _InFlight(save, job, stall=0.0)
        for optimizer in [] if forked else self.accelerator._optimizers:
            # On the torch optimizer inside accelerate's wrapper: its step() is the one that changes the state.
            inner = getattr(optimizer, "optimizer", optimizer)
            flight.hooks.append(inner.register_step_pre_hook(flight.hold_step))
        job.start()
        flight.stall = time.perf_counter() - save.started
        self._async = flight
        return None

    def poll(self, *, wait: bool = False) -> SaveCompleted | SaveFailed | None:
        """On every rank, at a step boundary, while a save is in flight: commit it once every rank's writer ended.

        One collective when some writer still runs (the outcome is then None); when all ended, the failure of
        any rank is agreed (``save_failed`` on every rank) or the checkpoint is committed (``save_completed``).
        ``wait``: wait for this rank's writer first (at close, or before a stop), so this call settles the save.
        """
        flight = self._async
        if flight is None:
            return None
        if wait:
            flight.job.wait()
        polled = time.perf_counter()
        ended = flight.job.done.is_set()
        running, stall_ms, write_ms = self.runtime.agreed(
            [int(not ended), round(flight.stall * 1000), round(flight.job.seconds * 1000) if ended else 0]
        )
        if running:
            return None
        self._async = None
        flight.remove_hooks()  # (the writer ended, so they would not wait anyway)

        def check() -> None:
            if flight.job.error is not None:
                raise OSError(flight.job.error)

        error = self.runtime.agree("writing", check)
        if error is not None:
            return self._fail(flight.save, error.replace(": OSError: ", ": ", 1))
        flight.save.digests = flight.job.digests
        return self._commit(flight.save, stall_before=stall_ms / 1000, write_before=write_ms / 1000, since=polled)

    # -- one save, start to end -------------------------------------------------

    def _start(self, decision: Decision) -> _Save:
        save = _Save(self, decision)
        self.runtime.bus.publish(SaveStarted(path=str(save.final), **decision.event_fields()))
        save.started = time.perf_counter()
        return save

    def _fail(self, save: _Save, error: str) -> SaveFailed:
        if self.is_committer:
            discard(save.staging)
            if save.renamed:
                # Another node's commit failed (one committer per node): take this node's copy back,
                # so that no node keeps a checkpoint the others lack.
                try:
                    withdraw(save.final)
                except OSError as exc:
                    logger.warning("ckptbus: could not take back %s (%s); delete it by hand", save.final, exc)
        return self.runtime.failed(save.decision, save.decision.kind, error)

    def _commit(
        self, save: _Save, *, stall_before: float, write_before: float, since: float
    ) -> SaveCompleted | SaveFailed:
        """Commit on the committer, agreed by every rank. Training is held from ``since``, on top of ``stall_before``
        seconds held earlier; ``write_before`` seconds of writing happened before ``since``."""
        decision = save.decision
        committed_bytes = 0
        timings = [0.0, 0.0]
        digests = {name: d for part in self.runtime.gathered(save.digests) for name, d in part.items()}

        def finish() -> None:
            nonlocal committed_bytes
            if self.is_committer:
                apply_umask_modes(save.staging)  # one mode for every file, whoever wrote it; fsynced below

                def timings_with_fsync() -> dict[str, float]:
                    now = time.perf_counter()
                    return {
                        "seconds": round(now - save.started, 3),
                        "stall_seconds": round(stall_before + now - since, 3),
                        "write_seconds": round(write_before + now - since, 3),
                    }

                manifest = commit(
                    save.staging,
                    save.final,
                    self.runtime.manifest_fields(decision, decision.kind),
                    timings_with_fsync,
                    digests,
                    read_back=self.digests != "none",
                )
                committed_bytes = manifest.bytes
                timings[:] = [manifest.stall_seconds, manifest.write_seconds]
                save.renamed = True

        error = self.runtime.agree("committing", finish)
        if error is not None:
            return self._fail(save, error)
        return self.runtime.completed(
            decision,
            decision.kind,
            save.final,
            committer=self.is_committer,
            figures=(committed_bytes, timings[0], timings[1]),
            started=save.started,
        )

    # -- the stages ---------------------------------------------------------

    def _write(self, kind: str, staging: Path, writes: set[str] | None) -> dict[str, str]:
        """Write this rank's part of the save; return the digests of the files ckptbus wrote itself."""
        if kind == "full" and writes is not None:
            snapshot = self._snapshot.take(self.accelerator, writes=writes, copy=False)
            job = WriteJob(snapshot, staging, torch_save_crc32=self.torch_save_crc32, digest=self.digests == "written")
            try:
                job.write()
            finally:
                self.hash_wait_seconds += job.hash_wait_seconds
            return job.digests
        if kind == "full":  # a run ckptbus cannot write itself (DeepSpeed, FSDP, a save_state pre-hook)
            with torch_save_crc32(self.torch_save_crc32):  # see plugins/saving/torch_save_crc.py
                self.accelerator.save_state(str(staging))
            return {}
        save_weights(self.accelerator, self.model(), staging, is_committer=self.is_committer)
        return {}

    def _writes(self) -> set[str] | None:
        """Collective: the files of a full save this rank writes, or None where ckptbus does not write them itself.

        Under replicated state (one process, DDP) every rank holds the same
        model and optimizer state, so the shared files are spread over the
        ranks by bytes (:func:`plan_writers`) and written in parallel. With
        ``save_on_each_node`` the main process of each machine writes them
        all, as accelerate does. The ranks check that they made the same plan
        (one small collective) and fall back to that rule otherwise.
        """
        if self.async_unsupported() is not None:
            return None
        sizes = HostSnapshot.shared_sizes(self.accelerator)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        if self.accelerator.project_configuration.save_on_each_node:
            return set(sizes) if self.accelerator.is_local_main_process else set()
        plan = plan_writers(sizes, world if self.parallel_writers else 1)
        fingerprint = zlib.crc32(repr(sorted(plan.items())).encode())
        highest, minus_lowest = self.runtime.agreed([fingerprint, -fingerprint])
        if highest != -minus_lowest:
            logger.warning("ckptbus: the ranks hold different state sizes; the main process writes the shared files")
            return set(sizes) if rank == 0 else set()
        return {name for name, writer in plan.items() if writer == rank}
