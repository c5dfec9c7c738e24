"""The runtime of one run: what every adapter shares, owned once.

It holds the bus, the trigger sources, the votes, the coordinator, the event
log and the run's saved / stop / failure state, and answers status, request,
exit code, resume resolution and shutdown. An adapter (the accelerate loop,
the ``transformers.Trainer`` callback, axolotl) supplies only what differs:
where a step ends, and how a checkpoint is written.

The life of a runtime, on every rank::

    runtime = Runtime(config, sources=...)      # sources checked here
    runtime.start(exchange, rank=..., ...)      # collective: layout probe, vote channel; sources start
    ...  runtime.poll(step); decision = runtime.decide(step)   # at each step boundary
         ... the adapter writes, then runtime.completed(...) / runtime.failed(...)
    runtime.shutdown("training ended")          # no collective
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ckptbus import (
    Bus,
    CheckpointConfig,
    CheckpointError,
    EventLog,
    SaveCompleted,
    SaveFailed,
    SaveKind,
    SaveRequested,
    SetupError,
)
from ckptbus._coordinator import Coordinator, Decision, exit_status, reason_table
from ckptbus._eventlog import EVENT_LOG_NAME
from ckptbus._layout import CheckpointInfo, checkpoint_path, read_checkpoint, rotate
from ckptbus._lock import OutputDirLock, acquire
from ckptbus._logging import set_up as set_up_logging
from ckptbus._resume import LATEST, LATEST_OR_FRESH, Resolution, resolve
from ckptbus._source import RunInfo, TriggerSource, check_source, close_all

from .distributed import TorchExchange, agree, check_output_dir_layout, open_votes
from .shared_votes import SharedVotes
from .sources.file import FileTrigger
from .sources.launcher import LauncherWatch
from .sources.signals import SignalTrigger
from .sources.unix_socket import UnixSocketTrigger

logger = logging.getLogger("ckptbus")


def builtin_sources(config: CheckpointConfig) -> list[TriggerSource]:
    """ckptbus's own trigger sources, as the config asks for them (each acts on the ranks it should)."""
    dyn = config.dynamic_checkpoint
    if not dyn.enabled:
        return []
    sources: list[TriggerSource] = [FileTrigger(dyn.trigger_file_path, check_interval=dyn.check_interval)]
    if any(action != "none" for action in dyn.signals.actions().values()):
        sources.append(SignalTrigger(dyn.signals.actions(), debounce_seconds=dyn.signals.debounce_seconds))
    if dyn.on_launcher_exit != "none":
        sources.append(LauncherWatch(dyn.on_launcher_exit))
    if dyn.socket.enabled:
        sources.append(UnixSocketTrigger(path=dyn.socket.path, timeout=dyn.socket.timeout))
    return sources


def _not_started(vote: object) -> list[int]:
    raise RuntimeError("ckptbus: the ranks cannot vote before the runtime is started")


class Runtime:
    """One run's checkpointing state and machinery, shared by every adapter. See the module docstring.

    ``sources`` adds trigger sources of the user's own to those the config
    enables; each is checked here (:func:`~ckptbus._source.check_source`), so
    a wrong object fails before training starts. Requests published on
    :attr:`bus` before :meth:`start` wait for the first vote.
    """

    def __init__(self, config: CheckpointConfig, *, sources: Iterable[object] = ()) -> None:
        set_up_logging()
        self.config = config
        self.bus = Bus()
        """The run's bus: subscribe to ``save_completed`` and friends here."""
        self.sources: list[TriggerSource] = builtin_sources(config) + [check_source(s) for s in sources]
        self.signals = next((s for s in self.sources if isinstance(s, SignalTrigger)), None)
        dyn = config.dynamic_checkpoint
        self.coordinator = Coordinator(
            _not_started,
            check_interval=dyn.check_interval,
            save_steps=config.save_steps,
            # A source that must be honoured within a step (signals, the launcher watch) has ranks vote every step.
            every_step=any(getattr(s, "urgent", False) for s in self.sources),
            reasons=reason_table(r for s in self.sources if isinstance(r := getattr(s, "reason", None), str)),
        )
        self.bus.subscribe("save_requested", self.coordinator.enqueue)
        self.exchange: TorchExchange | None = None
        self.rank = 0
        self.world_size = 1
        self.last_step = 0
        self.stopped = False
        self.running = False
        self._stop_signum = 0
        self._stop_unfinished = False
        self._failed_save: SaveFailed | None = None
        self._saved: dict[int, SaveCompleted] = {}
        self._votes: SharedVotes | None = None
        self._event_log: EventLog | None = None
        # Whether this rank reads (verifies) and locks for its filesystem: the main process, or with
        # save_on_each_node each machine's local main process. Every rank before start() (nothing to agree with).
        self._filesystem_main = True
        self._output_dir_lock: OutputDirLock | None = None

    @property
    def output_dir(self) -> Path:
        """The run's output_dir, absolute: paths in events, replies and logs mean the same from any directory."""
        return Path(os.path.abspath(self.config.output_dir))

    # -- start --------------------------------------------------------------

    def start(
        self,
        exchange: TorchExchange,
        *,
        rank: int,
        local_rank: int,
        save_on_each_node: bool,
        step: int = 0,
    ) -> None:
        """Collective (every rank calls it): check the output_dir layout, take the output_dir lock (one run per
        output_dir, released by :meth:`shutdown`), open the votes, start the sources.

        Raises :class:`~ckptbus.SetupError` on every rank for an output_dir
        whose sharing does not match ``save_on_each_node``, an output_dir
        another run holds (naming it), or ranks whose sources declare
        different reasons.
        """
        self.exchange = exchange
        self.rank = rank
        self.world_size = exchange.world_size
        set_up_logging(local_rank)
        self.last_step = step
        self.stopped = False
        self._stop_signum = 0
        self._stop_unfinished = False
        self._failed_save = None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        check_output_dir_layout(
            self.output_dir,
            exchange,
            is_main=rank == 0,
            is_local_main=local_rank == 0,
            save_on_each_node=save_on_each_node,
        )
        self._filesystem_main = rank == 0 or (save_on_each_node and local_rank == 0)
        self._lock_output_dir()
        self._check_same_reasons()
        self._votes, votes = open_votes(rank, exchange, self.coordinator.vote_length)
        self.coordinator.exchange = votes
        # Pipelined: a vote started at one step is read at the next, while it computes (Coordinator docs).
        self.coordinator.start_exchange = votes.start if self.world_size > 1 else None
        if self.config.dynamic_checkpoint.event_log and rank == 0:
            self._event_log = EventLog(self.output_dir / EVENT_LOG_NAME).attach(self.bus)
        run = RunInfo(
            rank=rank, world_size=self.world_size, local_rank=local_rank, output_dir=self.output_dir, status=self.status
        )
        self.running = True
        for source in self.sources:
            source.start(self.bus, run)

    def _lock_output_dir(self) -> None:
        """Collective: one run per output_dir. The filesystem's main rank takes the lock (ckptbus/_lock.py);
        a refusal there is a :class:`~ckptbus.SetupError` on every rank, before anything is written."""
        refusal: str | None = None
        if self._filesystem_main:
            try:
                self._output_dir_lock = acquire(self.output_dir)
            except SetupError as exc:
                refusal = str(exc)
            except OSError as exc:
                # An output_dir where nothing can be created fails every save the same way; that is reported
                # (and on_save_failure decides) at the first save, as before the lock existed.
                logger.warning(
                    "ckptbus: cannot create the lock file in %s (%s): a second run on this output_dir would not "
                    "be refused",
                    self.output_dir,
                    exc.strerror,
                )
        refusal = self._refused_anywhere(refusal)
        if refusal is not None:
            self._release_output_dir()
            raise SetupError(refusal)

    def _release_output_dir(self) -> None:
        if self._output_dir_lock is not None:
            self._output_dir_lock.release()
            self._output_dir_lock = None

    def _check_same_reasons(self) -> None:
        table = "\0".join(self.coordinator.reasons).encode()
        crc = zlib.crc32(table)
        highest, minus_lowest = self.agreed([crc, -crc])
        if highest != -minus_lowest:
            raise SetupError(
                "the ranks run trigger sources with different reasons (votes would not line up): pass the same "
                "sources=... on every rank; a source that should act on one rank only can check run.rank in start()"
            )

    # -- each step ----------------------------------------------------------

    def poll(self, step: int) -> None:
        """Every source looks at this step boundary (before the ranks vote)."""
        self.last_step = step
        for source in self.sources:
            source.poll(step)

    def decide(self, step: int, *, force: bool = False, scheduled: bool = True) -> Decision | None:
        """Collective at due steps: what every rank agreed to save now, or None (:meth:`Coordinator.decide`)."""
        return self.coordinator.decide(step, force=force, scheduled=scheduled)

    def already_saved(self, decision: Decision) -> SaveCompleted | None:
        """If this step is on disk in a kind that covers ``decision``, answer the requests with it and return it."""
        earlier = self._saved.get(decision.step)
        if earlier is None or (earlier.kind != "full" and decision.kind != "weights"):
            return None
        answer = SaveCompleted(
            path=earlier.path, bytes=earlier.bytes, seconds=0.0, **decision.event_fields(kind=earlier.kind)
        )
        self.bus.publish(answer)
        return answer

    def stop_after(self, decision: Decision) -> None:
        """Record that the ranks stop at this step if ``decision`` asked for it (with its signal, for the exit code)."""
        if decision.exit_after:
            self.stopped = True
            self._stop_signum = self._stop_signum or decision.signum
            # A stop no signal asked for but the loss of the launcher did: the run did not finish, say so.
            self._stop_unfinished = self._stop_unfinished or "launcher" in decision.reasons

    def agreed(self, vote: Sequence[int]) -> list[int]:
        """Element-wise maximum of ``vote`` over the ranks (the run's collective; identity before start)."""
        return self.exchange(vote) if self.exchange is not None else list(vote)

    def gathered(self, obj: Any) -> list[Any]:
        """Every rank's small picklable ``obj``, in rank order (the run's collective; ``[obj]`` before start)."""
        return self.exchange.all_gather(obj) if self.exchange is not None else [obj]

    def agree(self, what: str, stage: Callable[[], None]) -> str | None:
        """Run ``stage`` here and agree with every rank whether it worked: None, or why not (plugins/distributed.py)."""
        return agree(self.agreed, self.rank, what, stage)

    # -- the outcome of a save ----------------------------------------------

    def failed(self, decision: Decision, kind: SaveKind, error: str) -> SaveFailed:
        """Every rank agreed that the save of ``decision`` failed: log it once, publish it, record it."""
        if self.rank == 0:
            logger.error("ckptbus: %s checkpoint at step %d failed: %s", kind, decision.step, error)
        outcome = SaveFailed(error=error, **decision.event_fields(kind))
        self.bus.publish(outcome)
        self.settle(outcome)
        return outcome

    def completed(
        self,
        decision: Decision,
        kind: SaveKind,
        path: Path,
        *,
        committer: bool,
        figures: tuple[int, float, float],
        started: float,
    ) -> SaveCompleted:
        """Every rank agreed that ``path`` is committed: rotate older checkpoints, then publish and record it.

        ``figures`` are the committer's bytes, stall and write seconds (as in
        the manifest); they travel to every rank in one collective.
        """
        seconds = time.perf_counter() - started
        if committer:
            self._rotate(path)
        nbytes, stall_ms, write_ms = self.agreed([figures[0], round(figures[1] * 1000), round(figures[2] * 1000)])
        if self.rank == 0:
            logger.info(
                "ckptbus: saved %s checkpoint %s (%d bytes) in %.2f s (training held %.2f s)",
                kind,
                path,
                nbytes,
                seconds,
                stall_ms / 1000,
            )
        outcome = SaveCompleted(
            path=str(path),
            bytes=nbytes,
            seconds=seconds,
            stall_seconds=stall_ms / 1000,
            write_seconds=write_ms / 1000,
            **decision.event_fields(kind),
        )
        self.bus.publish(outcome)
        self.settle(outcome)
        return outcome

    def settle(self, outcome: SaveCompleted | SaveFailed | None) -> None:
        """Record the agreed outcome of a save (None: nothing ended yet)."""
        if isinstance(outcome, SaveCompleted):
            self._saved[outcome.step] = outcome
        elif outcome is not None and self.config.dynamic_checkpoint.on_save_failure == "stop":
            # Every rank got the same agreed outcome, so every rank stops at this step.
            self.stopped = True
            self._failed_save = outcome

    def manifest_fields(self, decision: Decision, kind: SaveKind) -> dict[str, Any]:
        """What the manifest of this save records besides its files and times."""
        fields = decision.event_fields(kind)
        return {
            "step": decision.step,
            "kind": kind,
            "reason": decision.reason,
            "world_size": self.world_size,
            "labels": list(fields["labels"]),
            "request_ids": list(fields["request_ids"]),
        }

    def _rotate(self, final: Path) -> None:
        limit = self.config.save_total_limit
        if limit is None:
            return
        try:
            for path in rotate(self.output_dir, limit, on_demand=self.config.rotate_on_demand, keep=(final,)):
                logger.info("ckptbus: save_total_limit=%d: deleted %s", limit, path)
        except OSError as exc:
            logger.warning("ckptbus: rotation failed (%s); older checkpoints are kept", exc)

    # -- what scripts and the socket read -----------------------------------

    @property
    def stop_requested(self) -> bool:
        """True once training must stop, or a stopping signal reached this rank and waits for the next vote."""
        return self.stopped or (self.signals is not None and self.signals.stop_requested)

    @property
    def exit_code(self) -> int:
        """``128 + signal number`` after a stop asked for by a signal, 1 after a stop because a save failed
        (``on_save_failure: stop``) or because the launcher is gone, else 0."""
        return exit_status(self.stopped, self._stop_signum, self._failed_save is not None or self._stop_unfinished)

    @property
    def failed_save(self) -> SaveFailed | None:
        """The failed save that stopped training (``on_save_failure: stop``), or None."""
        return self._failed_save

    @property
    def last_checkpoint(self) -> SaveCompleted | None:
        """The newest checkpoint this run completed, or None."""
        return self._saved[max(self._saved)] if self._saved else None

    def status(self) -> dict[str, object]:
        """A snapshot for status displays; safe to call from any thread (it only reads)."""
        last = self.last_checkpoint
        return {
            "step": self.last_step,
            "last_checkpoint": last.path if last else None,
            "last_checkpoint_step": last.step if last else None,
            "pending_requests": self.coordinator.pending_count(),
            "world_size": self.world_size,
            "stopping": self.stopped,
        }

    def request(self, kind: SaveKind = "full", *, label: str | None = None, exit_after: bool = False) -> str:
        """Ask for a checkpoint from any thread; returns the request id (served at the next vote)."""
        request = SaveRequested(kind=kind, reason="api", label=label, exit_after=exit_after)
        self.bus.publish(request)
        return request.request_id

    # -- resume -------------------------------------------------------------

    def resolve_resume(self, checkpoint: str | os.PathLike[str] | None = None) -> CheckpointInfo | None:
        """The complete full checkpoint to resume from, verified; or None (nothing asked, or a fresh start).

        ``checkpoint``: a path, ``"latest"``, ``"latest_or_fresh"``, or None
        for the config's ``resume_from_checkpoint`` (ckptbus/_resume.py has
        the rule). Every file is checked against the manifest
        (``dynamic_checkpoint.verify``) before anything is loaded. Once
        started this is a collective: the main rank of each filesystem reads
        and verifies, the others take the step it chose, and a refusal on
        one rank is a :class:`~ckptbus.CheckpointError` on every rank,
        naming the checkpoint, the file and the cause. Before start (the
        Trainer callback) every rank verifies on its own.
        """
        target = checkpoint if checkpoint is not None else self.config.resume_from_checkpoint
        if target is None:
            return None
        target = os.fspath(target)
        resolution: Resolution | None = None
        refusal: str | None = None
        if self._filesystem_main:
            try:
                resolution = self._resolve(target)
            except CheckpointError as exc:
                refusal = str(exc)
        step = resolution.info.step if resolution is not None and resolution.info is not None else None
        answers = [a for a in self.gathered((step, refusal) if self._filesystem_main else None) if a is not None]
        refusals = [r for _, r in answers if r is not None]
        if refusals:
            raise CheckpointError(refusal or refusals[0])
        steps = sorted({-1 if s is None else s for s, _ in answers})
        if len(steps) > 1:
            raise CheckpointError(
                f"ranks found different checkpoints for {target!r} (steps {steps[0]} to {steps[-1]}): "
                "with one output_dir per node every node must hold the same checkpoints; pass the path of one "
                "that all nodes have"
            )
        if steps[0] < 0:
            return None
        info = resolution.info if resolution is not None else None
        refusal = None
        if info is None:
            try:
                info = self._agreed_checkpoint(target, steps[0])
            except CheckpointError as exc:
                refusal = str(exc)
        refusal = self._refused_anywhere(refusal)
        if refusal is not None or info is None:
            raise CheckpointError(refusal or f"resume from {target!r} failed on another rank (see its log)")
        if info.manifest.world_size != self.world_size and self.running:
            logger.warning(
                "ckptbus: %s was saved by %d processes and this run has %d: the RNG state of every rank cannot be "
                "restored, so the run will not repeat an uninterrupted one exactly",
                info.path,
                info.manifest.world_size,
                self.world_size,
            )
        return info

    def _resolve(self, target: str) -> Resolution:
        """Choose and verify (ckptbus/_resume.py), and log what the user must know about the choice."""
        mode = self.config.dynamic_checkpoint.verify
        resolution = resolve(target, self.output_dir, mode)
        for line in (*resolution.skipped, *resolution.notes):
            logger.warning("ckptbus: resume_from_checkpoint=%s: %s", target, line)
        report = resolution.report
        if report is not None:
            # A checkpoint written before digests existed was checked by size only: say so louder.
            log = logger.warning if report.mode == "full" and report.note else logger.info
            log("ckptbus: checked before loading: %s", report.summary())
        elif target in (LATEST, LATEST_OR_FRESH) and not resolution.skipped:
            logger.info(
                "ckptbus: resume_from_checkpoint=%s: no complete full checkpoint in %s; starting fresh",
                target,
                self.output_dir,
            )
        return resolution

    def _agreed_checkpoint(self, target: str, step: int) -> CheckpointInfo:
        """On a rank that did not choose: the checkpoint its filesystem's main rank chose (sizes checked here)."""
        path = checkpoint_path(self.output_dir, step) if target in (LATEST, LATEST_OR_FRESH) else target
        info = read_checkpoint(path)
        if info.step != step:
            raise CheckpointError(f"{info.path} holds step {info.step}, the ranks agreed on step {step}")
        return info

    def loaded(self, info: CheckpointInfo, error: CheckpointError | None) -> None:
        """Collective, after every rank loaded ``info`` (or failed to): a failure on any rank is a
        :class:`~ckptbus.CheckpointError` on every rank, with the words of the rank that failed."""
        refusal = self._refused_anywhere(str(error) if error is not None else None)
        if refusal is not None:
            raise error if error is not None else CheckpointError(refusal)
        self.last_step = info.step

    def _refused_anywhere(self, refusal: str | None) -> str | None:
        """Collective: this rank's refusal, else the lowest other rank's, else None."""
        others = [r for r in self.gathered(refusal) if r is not None]
        return refusal if refusal is not None else (others[0] if others else None)

    # -- the end ------------------------------------------------------------

    def shutdown(self, why: str, *, abandoned: dict[str, Any] | None = None) -> None:
        """Release everything without any collective: a save that was not committed and every pending request
        fail with ``why``; the sources stop; the votes close; the output_dir is free for the next run. Safe to
        call twice."""
        if not self.running:
            self._release_output_dir()  # (a start() that failed after taking it)
            return
        self.running = False
        if abandoned is not None:
            self.bus.publish(
                SaveFailed(**abandoned, error=f"{why} before the checkpoint was committed; it was not made visible")
            )
        for request in self.coordinator.drain():
            self.bus.publish(SaveFailed.unserved(request, self.last_step, f"{why} before the request could be served"))
        close_all(self.sources)
        if self._votes is not None:
            self._votes.close()
            self._votes = None
        if self._event_log is not None:
            self._event_log.detach()
            self._event_log = None
        self._release_output_dir()  # last: the next run may start once everything here is closed


class RunControls:
    """What a training script reads and asks of its run, the same under every adapter (they inherit it)."""

    _runtime: Runtime

    @property
    def should_stop(self) -> bool:
        """True once the ranks agreed to stop training (after a save that asked to exit, or a failed save with
        ``on_save_failure: stop``)."""
        return self._runtime.stopped

    @property
    def stop_requested(self) -> bool:
        """True once training must stop, or a stopping signal reached this rank and waits for the next vote.

        Needs no collective, so a long evaluation or inner loop may check it
        as often as it likes to cut rank-local work short; the ranks agree on
        the stop (and save) at the next step boundary, which every rank must
        still reach.
        """
        return self._runtime.stop_requested

    @property
    def exit_code(self) -> int:
        """The exit status a script should end with: ``128 + signal number`` after a stop asked for by a signal,
        1 after a stop because a save failed (``on_save_failure: stop``) or the launcher is gone, else 0:
        ``sys.exit(x.exit_code)``."""
        return self._runtime.exit_code

    @property
    def failed_save(self) -> SaveFailed | None:
        """The failed save that stopped training (``on_save_failure: stop``), or None."""
        return self._runtime.failed_save

    @property
    def last_step(self) -> int:
        """The step of the last step boundary seen (or the resumed step)."""
        return self._runtime.last_step

    @property
    def last_checkpoint(self) -> SaveCompleted | None:
        """The newest checkpoint this run completed, or None."""
        return self._runtime.last_checkpoint

    def status(self) -> dict[str, object]:
        """A snapshot for status displays (what ``ckptbus status`` shows); safe from any thread (it only reads)."""
        return self._runtime.status()

    def request(self, kind: SaveKind = "full", *, label: str | None = None, exit_after: bool = False) -> str:
        """Ask for a checkpoint from any thread; returns the request id.

        It is saved at the next step where ranks vote: within ``check_interval``
        steps, or, while signals are handled, at this step or the next (the
        vote is pipelined with several ranks); watch ``bus.save_completed``
        for the result.
        """
        return self._runtime.request(kind, label=label, exit_after=exit_after)
