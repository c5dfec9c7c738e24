"""The runtime of one run: the step protocol, owned once, under every adapter.

It holds the bus, the trigger sources, the votes, the coordinator, the sink,
the event log and the run's saved / stop / failure state, and answers
status, request, exit code, resume resolution and shutdown. An adapter (the
accelerate loop, the ``transformers.Trainer`` callback, axolotl) only
translates its framework's hooks into the calls below and hands over its
sink (how a checkpoint is written: ckptbus/_sink.py).

The life of a runtime, on every rank::

    runtime = Runtime(config, sink, sources=...)     # sources and sink checked here
    runtime.start(ranks)                             # collective: layout probe, lock, votes; sources, sink start
    ...  if runtime.step_boundary(step): break       # at each step boundary (collective at due steps)
    runtime.close()                                  # collective: serve what is pending, then release
    # or, on an error path: runtime.abort(why)       # no collective: pending requests fail

One step boundary (:meth:`Runtime.step_boundary`), always in this order:

1. every source polls (the trigger file, a signal that arrived, the launcher);
2. a save in flight is polled (``async``: one small collective; at a
   scheduled step it is waited for, so the schedule is kept) or, for a
   ``deferred`` save the framework never made, failed;
3. with no save in flight and no stop agreed, the ranks vote
   (:meth:`Coordinator.decide`);
4. a decision is carried out: answered from disk if this step is already
   saved in a kind that covers it, else ``save_started`` is published and the
   sink writes it the way it planned (``sync``, ``async``, ``deferred``);
   an ``async`` save that asked the run to stop is settled before returning;
5. the stop is recorded if the decision asked for it.

Only the runtime publishes ``save_started``, ``save_completed`` and ``save_failed``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import zlib
from collections.abc import Iterable
from pathlib import Path

from ckptbus import (
    Bus,
    CheckpointConfig,
    CheckpointError,
    EventLog,
    RankFailure,
    SaveCompleted,
    SaveFailed,
    SaveKind,
    SaveRequested,
    SaveStarted,
    SetupError,
)
from ckptbus._coordinator import Coordinator, Decision, exit_status, reason_table
from ckptbus._layout import CheckpointInfo, checkpoint_path, read_checkpoint, rotate
from ckptbus._lock import OutputDirLock, acquire
from ckptbus._logging import set_up as set_up_logging
from ckptbus._names import EVENT_LOG_NAME
from ckptbus._remote_url import is_remote
from ckptbus._resume import LATEST, LATEST_OR_FRESH, Resolution, resolve
from ckptbus._sink import Outcome, SaveMode, SaveRecord, Sink, Written, check_sink
from ckptbus._source import RegisteredSource, RunInfo, close_all, register_source

from .distributed import Ranks, check_output_dir_layout, open_votes
from .rank_mirror import RankMirror
from .rescue import Rescued, rescue
from .shared_votes import SharedVotes, SharedVotesError
from .sources.file import FileTrigger
from .sources.launcher import LauncherWatch
from .sources.signals import SignalTrigger
from .sources.unix_socket import UnixSocketTrigger
from .tiers import RemoteTier

logger = logging.getLogger("ckptbus")


def builtin_sources(config: CheckpointConfig) -> list[object]:
    """ckptbus's own trigger sources, as the config asks for them (each acts on the ranks it should)."""
    dyn = config.dynamic_checkpoint
    if not dyn.enabled:
        return []
    sources: list[object] = [FileTrigger(dyn.trigger_file_path, check_interval=dyn.check_interval)]
    if any(action != "none" for action in dyn.signals.actions().values()):
        sources.append(SignalTrigger(dyn.signals.actions(), debounce_seconds=dyn.signals.debounce_seconds))
    if dyn.on_launcher_exit != "none":
        sources.append(LauncherWatch(dyn.on_launcher_exit))
    if dyn.socket.enabled:
        sources.append(UnixSocketTrigger(path=dyn.socket.path, timeout=dyn.socket.timeout))
    return sources


def _not_started(vote: object) -> list[int]:
    raise RuntimeError("ckptbus: the ranks cannot vote before the runtime is started")


class _InFlight:
    """The save begun at a step boundary and not settled yet: its decision, how it goes, when it started."""

    __slots__ = ("decision", "mode", "started")

    def __init__(self, decision: Decision, mode: SaveMode, started: float) -> None:
        self.decision, self.mode, self.started = decision, mode, started


class Runtime:
    """One run's checkpointing state and machinery, shared by every adapter. See the module docstring.

    ``sink`` writes the run's checkpoints (:class:`~ckptbus._sink.Sink`).
    ``sources`` adds trigger sources of the user's own to those the config
    enables. Both are checked here (:func:`~ckptbus._source.register_source`,
    :func:`~ckptbus._sink.check_sink`), so a wrong object fails before
    training starts. Requests published on :attr:`bus` before :meth:`start`
    wait for the first vote.
    """

    def __init__(self, config: CheckpointConfig, sink: object, *, sources: Iterable[object] = ()) -> None:
        set_up_logging()
        self.config = config
        self.bus = Bus()
        """The run's bus: subscribe to ``save_completed`` and friends here."""
        self.sink: Sink = check_sink(sink)
        self.sources: list[RegisteredSource] = [register_source(s) for s in (*builtin_sources(config), *sources)]
        dyn = config.dynamic_checkpoint
        self.coordinator = Coordinator(
            _not_started,
            check_interval=dyn.check_interval,
            save_steps=config.save_steps,
            # A source that must be honoured within a step (signals, the launcher watch) has ranks vote every step.
            every_step=any(s.urgent for s in self.sources),
            reasons=reason_table(s.reason for s in self.sources if s.reason is not None),
        )
        self.bus.subscribe("save_requested", self.coordinator.enqueue)
        self.ranks = Ranks()
        """Who this rank is and the run's collectives (one process until :meth:`start`)."""
        self.last_step = 0
        self.stopped = False
        self.running = False
        self._stop_signum = 0
        self._stop_unfinished = False
        self._failed_save: SaveFailed | None = None
        self._saved: dict[int, SaveCompleted] = {}
        self._in_flight: _InFlight | None = None
        self._votes: SharedVotes | None = None
        self._mirror: RankMirror | None = None
        self._copying = True  # (until a copy for the rescue fails to be written: _keep_copy)
        self._start_step = 0
        self._event_log: EventLog | None = None
        self._output_dir_lock: OutputDirLock | None = None
        self.tier: RemoteTier | None = None
        """The uploads to ``remote_dir`` (plugins/tiers/), on the main process of a run that has one."""

    @property
    def output_dir(self) -> Path:
        """The run's output_dir, absolute: paths in events, replies and logs mean the same from any directory."""
        return Path(os.path.abspath(self.config.output_dir))

    @property
    def world_size(self) -> int:
        return self.ranks.world_size

    @property
    def rank(self) -> int:
        return self.ranks.rank

    # -- start --------------------------------------------------------------

    def start(self, ranks: Ranks, *, step: int = 0) -> None:
        """Collective (every rank calls it): check the output_dir layout, take the output_dir lock (one run per
        output_dir, released at the end), open the votes, start the sources and the sink.

        Raises :class:`~ckptbus.SetupError` on every rank for an output_dir
        whose sharing does not match ``save_on_each_node``, an output_dir
        another run holds (naming it), or ranks whose sources declare
        different reasons.
        """
        self.ranks = ranks
        set_up_logging(ranks.local_rank)
        self.last_step = self._start_step = step
        self.stopped = False
        self._stop_signum = 0
        self._stop_unfinished = False
        self._failed_save = None
        self._in_flight = None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if ranks.collective is not None:
            check_output_dir_layout(
                self.output_dir,
                ranks.collective,
                is_main=ranks.is_main,
                is_local_main=ranks.local_rank == 0,
                save_on_each_node=ranks.save_on_each_node,
            )
        self._lock_output_dir()
        # Votes line up only if every rank has the same reason table and votes at the same steps.
        table = "\0".join((*self.coordinator.reasons, f"every_step={self.coordinator.every_step}"))
        if not ranks.all_equal(zlib.crc32(table.encode())):
            raise SetupError(
                "the ranks run trigger sources with different reasons or urgency (votes would not line up): pass "
                "the same sources=... on every rank; a source that should act on one rank only can check run.rank "
                "in start()"
            )
        self._start_tier()
        if ranks.collective is not None:
            self._votes, votes = open_votes(ranks.rank, ranks.collective, self.coordinator.vote_length)
            # What the ranks still alive need of a rank that dies (plugins/rank_mirror.py): one machine only.
            self._mirror = RankMirror.on(self._votes) if self._votes is not None else None
            self.coordinator.exchange = votes
            # Pipelined: a vote started at one step is read at the next, while it computes (Coordinator docs).
            self.coordinator.start_exchange = votes.start
        else:
            self.coordinator.exchange = list
            if self.config.dynamic_checkpoint.on_error != "none":
                self._mirror = RankMirror.alone()  # one process: the same rescue, with no one else to ask
        if self.config.dynamic_checkpoint.event_log and ranks.is_main:
            self._event_log = EventLog(self.output_dir / EVENT_LOG_NAME).attach(self.bus)
        run = RunInfo(
            rank=ranks.rank,
            world_size=ranks.world_size,
            local_rank=ranks.local_rank,
            output_dir=self.output_dir,
            status=self.status,
        )
        self.running = True
        for source in self.sources:
            source.start(self.bus, run)
        self.sink.start(ranks, self.output_dir)

    def _lock_output_dir(self) -> None:
        """Collective: one run per output_dir. The filesystem's main rank takes the lock (ckptbus/_lock.py);
        a refusal there is a :class:`~ckptbus.SetupError` on every rank, before anything is written."""
        refusal: str | None = None
        if self.ranks.committer:
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
        refusal = self.ranks.first_refusal(refusal)
        if refusal is not None:
            self._release_output_dir()
            raise SetupError(refusal)

    def _release_output_dir(self) -> None:
        if self._output_dir_lock is not None:
            self._output_dir_lock.release()
            self._output_dir_lock = None

    def _start_tier(self) -> None:
        """Collective with ``remote_dir``: the main process probes the bucket and starts the uploads
        (plugins/tiers/uploader.py); a refusal there is a :class:`~ckptbus.SetupError` on every rank."""
        if self.config.remote_dir is None:
            return
        refusal: str | None = None
        if self.ranks.is_main:
            tier = RemoteTier(self.config.remote_dir, self.config.remote)
            try:
                tier.start()
                self.tier = tier
            except SetupError as exc:
                refusal = str(exc)
        refusal = self.ranks.first_refusal(refusal)
        if refusal is not None:
            self._release_output_dir()
            raise SetupError(refusal)

    def _finish_uploads(self, *, collective: bool = False) -> None:
        """The main process waits for its uploads (``remote.exit_deadline_seconds``) and logs the last line; with
        ``collective`` (from :meth:`close`) the other ranks wait for it, so none exits (and has the launcher stop
        the main process) before the last checkpoint is in the bucket."""
        tier, self.tier = self.tier, None
        if tier is not None:
            line = tier.drain()
            if line:
                (logger.info if line.startswith("ckptbus: checkpoints safe") else logger.error)("%s", line)
        if collective and self.config.remote_dir is not None:
            self.ranks.max([0])

    # -- the step protocol ----------------------------------------------------

    def step_boundary(self, step: int, *, force: bool = False, framework_saves: bool = False) -> bool:
        """The whole protocol at the boundary after optimizer step ``step`` (module docstring); on every rank.
        Returns True when training must stop.

        ``force``: vote even if this step is not due (the last step of a
        Trainer, so requests still pending are saved by it).
        ``framework_saves``: the framework writes a checkpoint of this step
        on its own schedule (the Trainer's ``save_strategy``); it is recorded
        like a scheduled ckptbus save, merged with any request.

        If anything here raises (a rank died, so the vote found it gone; a
        collective failed), the ranks still alive save what ``on_error``
        asks (:meth:`fail`) before the exception goes on; a rank found gone
        raises :class:`~ckptbus.RankFailure`, whose message says what was saved.
        """
        try:
            return self._step_boundary(step, force=force, framework_saves=framework_saves)
        except Exception as exc:
            # A vote that found a rank gone, or saying it failed, is the echo of that rank's failure, not this one's.
            found_gone = isinstance(exc, SharedVotesError)
            line = self._fail(exc, echo=found_gone)
            if found_gone and line is not None:
                raise RankFailure(line) from exc
            raise

    def _step_boundary(self, step: int, *, force: bool, framework_saves: bool) -> bool:
        self.last_step = step
        if self._mirror is not None and self._copying and self.config.dynamic_checkpoint.on_error != "none":
            self._keep_copy(step)
        for source in self.sources:
            source.poll(step)
        flight = self._in_flight
        if flight is not None and flight.mode == "deferred":
            self._in_flight = None
            self.sink.abandon()
            self._publish_failed(flight.decision, "the framework did not save at the agreed step")
        elif flight is not None:
            # One small collective per step until it is committed. A scheduled save must not be skipped, so at its
            # step training waits for the one in flight.
            self._settle(self.sink.poll(wait=self.coordinator.is_scheduled(step)))
        if self._in_flight is None and not self.stopped:
            # While a save is in flight no new one is decided: requests stay pending until it is committed.
            decision = self.coordinator.decide(step, force=force)
            if decision is None and framework_saves:
                decision = Decision(step, "full", False, ("schedule",), ())
            if decision is not None:
                self._carry_out(decision)
        return self.stopped

    def _keep_copy(self, step: int) -> None:
        """This rank's copy of its own state for a rescue (docs/crash.md; its cost: docs/performance.md). A copy
        that cannot be written (a file size limit, /dev/shm full) never stops training: it is said once, and this
        rank's state is then missing from a rescue, which says so."""
        assert self._mirror is not None
        try:
            self._mirror.record(step, self.sink.rank_state())
        except OSError as exc:
            self._copying = False
            logger.warning(
                "ckptbus: rank %d cannot keep its copy for a rescue after a crash (%s); if a rank fails, this "
                "rank's RNG state of its last steps will be missing from the checkpoint the others save",
                self.rank,
                exc.strerror or exc,
            )

    def framework_saved(self, step: int) -> None:
        """The framework wrote its checkpoint of ``step`` (a ``deferred`` sink: the Trainer's ``on_save``); on
        every rank. Completes the save begun at this step's boundary, or one the framework made on its own
        (a save at an epoch's end), which is recorded as scheduled."""
        flight = self._in_flight
        if flight is None or flight.decision.step != step:
            self._carry_out(Decision(step, "full", False, ("schedule",), ()))
        self._settle(self.sink.poll(wait=True))

    def _carry_out(self, decision: Decision) -> None:
        self._carry_out_planned(*self.sink.plan(decision))

    def _carry_out_planned(self, decision: Decision, mode: SaveMode) -> None:
        if not self._answer_from_disk(decision):
            record = SaveRecord.of(decision, self.world_size)
            self.bus.publish(
                SaveStarted(path=str(checkpoint_path(self.output_dir, decision.step)), **decision.event_fields())
            )
            started = time.perf_counter()
            if mode == "sync":
                self._in_flight = _InFlight(decision, mode, started)
                self._settle(self.sink.execute(record))
            else:
                failure = self.sink.begin(record)
                self._in_flight = _InFlight(decision, mode, started)
                if failure is not None:
                    self._settle(failure)
                elif mode == "async" and decision.exit_after:
                    self._settle(self.sink.poll(wait=True))  # training stops at this step: the save must be committed
        if decision.exit_after:
            self.stopped = True
            self._stop_signum = self._stop_signum or decision.signum
            # A stop no signal asked for but the loss of the launcher did: the run did not finish, say so.
            self._stop_unfinished = self._stop_unfinished or "launcher" in decision.reasons

    def _answer_from_disk(self, decision: Decision) -> bool:
        """If this step is on disk in a kind that covers ``decision``, answer the requests with it."""
        earlier = self._saved.get(decision.step)
        if earlier is None or (earlier.kind != "full" and decision.kind != "weights"):
            return False
        self.bus.publish(
            SaveCompleted(
                path=earlier.path, bytes=earlier.bytes, seconds=0.0, **decision.event_fields(kind=earlier.kind)
            )
        )
        return True

    # -- the outcome of a save ----------------------------------------------

    def _settle(self, outcome: Outcome | None) -> None:
        """Publish and record the agreed outcome of the save in flight (None: it has not ended yet)."""
        flight = self._in_flight
        if outcome is None or flight is None:
            return
        self._in_flight = None
        if isinstance(outcome, Written):
            self._completed(flight, outcome)
        else:
            self._publish_failed(flight.decision, outcome.error)

    def _publish_failed(self, decision: Decision, error: str) -> None:
        if self.ranks.is_main:
            logger.error("ckptbus: %s checkpoint at step %d failed: %s", decision.kind, decision.step, error)
        outcome = SaveFailed(error=error, **decision.event_fields())
        self.bus.publish(outcome)
        if self.config.dynamic_checkpoint.on_save_failure == "stop":
            # Every rank got the same agreed outcome, so every rank stops at this step.
            self.stopped = True
            self._failed_save = outcome

    def _completed(self, flight: _InFlight, written: Written) -> None:
        """Every rank agreed the checkpoint is committed: rotate older ones, then publish and record it. The
        committer's figures (as in its manifest) travel to every rank in one collective."""
        seconds = time.perf_counter() - flight.started
        if self.ranks.committer:
            if self.tier is not None:
                self.tier.submit(read_checkpoint(written.path))  # uploaded in the background, after the commit
            self._rotate(written.path)
        nbytes, stall_ms, write_ms = self.ranks.max(
            [written.bytes, round(written.stall_seconds * 1000), round(written.write_seconds * 1000)]
        )
        decision = flight.decision
        if self.ranks.is_main:
            logger.info(
                "ckptbus: saved %s checkpoint %s (%d bytes) in %.2f s (training held %.2f s)",
                decision.kind,
                written.path,
                nbytes,
                seconds,
                stall_ms / 1000,
            )
        outcome = SaveCompleted(
            path=str(written.path),
            bytes=nbytes,
            seconds=seconds,
            stall_seconds=stall_ms / 1000,
            write_seconds=write_ms / 1000,
            **decision.event_fields(),
        )
        self.bus.publish(outcome)
        self._saved[outcome.step] = outcome

    def _rotate(self, final: Path) -> None:
        limit = self.config.save_total_limit
        if limit is None:
            return
        try:
            # A checkpoint whose upload is not complete stays on disk (its upload reads it).
            keep = (final, *(self.tier.unfinished() if self.tier is not None else ()))
            for path in rotate(self.output_dir, limit, on_demand=self.config.rotate_on_demand, keep=keep):
                logger.info("ckptbus: save_total_limit=%d: deleted %s", limit, path)
        except OSError as exc:
            logger.warning("ckptbus: rotation failed (%s); older checkpoints are kept", exc)

    # -- what scripts and the socket read -----------------------------------

    @property
    def stop_requested(self) -> bool:
        """True once training must stop, or a stopping signal reached this rank and waits for the next vote."""
        return self.stopped or any(source.stop_requested() for source in self.sources)

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
        votes = "collective" if self.ranks.collective is not None else "none"
        return {
            "step": self.last_step,
            "last_checkpoint": last.path if last else None,
            "last_checkpoint_step": last.step if last else None,
            "pending_requests": self.coordinator.pending_count(),
            "world_size": self.world_size,
            "stopping": self.stopped,
            # How the ranks vote, which sets what a step costs (benchmarks/overhead.py reads both): at every step
            # (a source must be honoured within one) or every check_interval steps; through shared memory (one
            # machine), a collective (between machines, or CKPTBUS_VOTES=collective), or not at all (one process).
            "votes_every_step": self.coordinator.every_step,
            "votes": "shared_memory" if self._votes is not None else votes,
            # The upload backlog to remote_dir (queued, in flight, failed) and the last upload's throughput.
            "uploads": self.tier.status() if self.tier is not None else None,
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
        if self.ranks.committer:
            try:
                resolution = self._resolve(target)
            except CheckpointError as exc:
                refusal = str(exc)
        step = resolution.info.step if resolution is not None and resolution.info is not None else None
        answers = [a for a in self.ranks.gather((step, refusal) if self.ranks.committer else None) if a is not None]
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
        refusal = self.ranks.first_refusal(refusal)
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
        resolution = resolve(
            target, self.output_dir, mode, remote=self.config.remote_dir, parallelism=self.config.remote.parallelism
        )
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
        # latest, and a checkpoint in a bucket, are in output_dir by now (downloaded there by the main rank).
        here = target in (LATEST, LATEST_OR_FRESH) or is_remote(target)
        path = checkpoint_path(self.output_dir, step) if here else target
        info = read_checkpoint(path)
        if info.step != step:
            raise CheckpointError(f"{info.path} holds step {info.step}, the ranks agreed on step {step}")
        return info

    def loaded(self, info: CheckpointInfo, error: CheckpointError | None) -> None:
        """Collective, after every rank loaded ``info`` (or failed to): a failure on any rank is a
        :class:`~ckptbus.CheckpointError` on every rank, with the words of the rank that failed."""
        refusal = self.ranks.first_refusal(str(error) if error is not None else None)
        if refusal is not None:
            raise error if error is not None else CheckpointError(refusal)
        self.last_step = info.step

    # -- the end ------------------------------------------------------------

    def close(self, *, serve: bool = True) -> None:
        """End of training, on every rank (a collective): serve what is pending, then release everything.

        A stopping signal that arrived after the last step still gets its
        save; a save in flight is settled (an ``async`` one committed, a
        ``deferred`` one the framework did not make failed); requests still
        pending are saved at the last step. ``serve=False`` is for a
        framework that cannot write any more (the Trainer after its last
        step, whose last boundary already voted with ``force``): what is
        pending then fails with "training ended". Safe to call twice.
        """
        if not self.running:
            self._release_output_dir()  # (a start() that failed after taking it)
            return
        try:
            if serve:
                for source in self.sources:
                    if source.urgent:
                        source.poll(self.last_step)  # a signal after the last step still gets its save
                flight = self._in_flight
                if flight is not None and flight.mode == "async":
                    self._settle(self.sink.poll(wait=True))  # an asynchronous save in flight is committed first
                if self._in_flight is None:
                    decision = self.coordinator.decide(self.last_step, force=True, scheduled=False)
                    planned = self.sink.plan(decision) if decision is not None else None
                    if planned is not None and planned[1] != "deferred":
                        self._carry_out_planned(*planned)
                        if self._in_flight is not None:
                            self._settle(self.sink.poll(wait=True))  # begun asynchronously: committed before the end
                    elif planned is not None:
                        # Not a failed save (the run finished): requests that came too late, answered as such.
                        self.bus.publish(
                            SaveFailed(
                                error="training ended before the framework could save", **planned[0].event_fields()
                            )
                        )
            self._finish_uploads(collective=True)
        finally:
            self.abort("training ended")

    def abort(self, why: str) -> None:
        """Release everything without any collective (error paths, and the end of :meth:`close`): a save not
        committed and every pending request fail with ``why``; the sources stop; the votes close; the
        output_dir is free for the next run. Safe to call twice."""
        if not self.running:
            self._release_output_dir()  # (a start() that failed after taking it)
            return
        self.running = False
        flight, self._in_flight = self._in_flight, None
        if flight is not None:
            self.sink.abandon()
            self.bus.publish(
                SaveFailed(
                    error=f"{why} before the checkpoint was committed; it was not made visible",
                    **flight.decision.event_fields(),
                )
            )
        for request in self.coordinator.drain():
            self.bus.publish(SaveFailed.unserved(request, self.last_step, f"{why} before the request could be served"))
        close_all(self.sources)
        if self._mirror is not None:
            self._mirror.close()
            self._mirror = None
        if self._votes is not None:
            self._votes.close()
            self._votes = None
        if self._event_log is not None:
            self._event_log.detach()
            self._event_log = None
        self._finish_uploads()  # the last checkpoint's upload, within its deadline (no collective here)
        self._release_output_dir()  # last: the next run may start once everything here is closed

    def fail(self, error: BaseException) -> str | None:
        """Training raised ``error`` on this rank (an adapter's error path), or a step boundary did: the ranks
        still alive save the last step boundary as ``on_error`` asks, on their own (plugins/rescue.py), then
        :meth:`abort`. No collective. Returns the line that says who failed and what was saved (logged once), or
        None (not running, or not an ``Exception``: a ``KeyboardInterrupt`` or ``SystemExit`` asks to leave now).
        Safe to call twice."""
        return self._fail(error, echo=False)

    def _fail(self, error: BaseException, *, echo: bool) -> str | None:
        if not self.running:
            self._release_output_dir()
            return None
        # Nothing to rescue before a step completed: a refusal at start-up (a damaged checkpoint, a setup error) is
        # the whole story, said by its own message.
        rescuable = isinstance(error, Exception) and self.last_step > self._start_step
        line = self._rescue(None if echo or not isinstance(error, Exception) else error) if rescuable else None
        self.abort(f"training stopped with {type(error).__name__}")
        return line

    def _rescue(self, error: Exception | None) -> str:
        flight, self._in_flight = self._in_flight, None
        if flight is not None:  # never committed: its staging stays invisible (the rescue may reuse its name)
            self.sink.abandon()
            self.bus.publish(
                SaveFailed(error="a rank failed before this checkpoint was committed", **flight.decision.event_fields())
            )
        on_error = self.config.dynamic_checkpoint.on_error
        rescued = rescue(
            self._mirror,
            self.sink,
            output_dir=self.output_dir,
            step=self.last_step,
            start_step=self._start_step,
            kind=None if on_error == "none" else on_error,
            error=error,
        )
        self._publish_rescue(rescued)
        if rescued.speaker:
            logger.error("ckptbus: %s", rescued.line)
        self._upload_rescued()
        return rescued.line

    def _upload_rescued(self) -> None:
        """The main process hands the rescued checkpoint (whichever rank wrote it) to the uploads, which
        :meth:`abort` then waits for within ``remote.exit_deadline_seconds``."""
        done = self._mirror.rescued() if self._mirror is not None else None
        if self.tier is None or done is None:
            return
        with contextlib.suppress(CheckpointError):  # (nothing was saved: the line said why)
            self.tier.submit(read_checkpoint(checkpoint_path(self.output_dir, done[0])))

    def _publish_rescue(self, rescued: Rescued) -> None:
        """The rescue this rank wrote, on the bus (and in the event log, whichever rank wrote it)."""
        decision, outcome = rescued.decision, rescued.outcome
        if decision is None or outcome is None:
            return
        log = None
        if self._event_log is None and self.config.dynamic_checkpoint.event_log:
            log = EventLog(self.output_dir / EVENT_LOG_NAME).attach(self.bus)  # (the main process may be gone)
        try:
            fields = decision.event_fields()
            self.bus.publish(SaveStarted(path=str(checkpoint_path(self.output_dir, decision.step)), **fields))
            if isinstance(outcome, Written):
                completed = SaveCompleted(
                    path=str(outcome.path),
                    bytes=outcome.bytes,
                    seconds=outcome.write_seconds,
                    stall_seconds=outcome.stall_seconds,
                    write_seconds=outcome.write_seconds,
                    **fields,
                )
                self._saved[decision.step] = completed
                self.bus.publish(completed)
            else:
                self.bus.publish(SaveFailed(error=outcome.error, **fields))
        finally:
            if log is not None:
                log.detach()

    def shutdown(self, why: str) -> None:
        """Alias of :meth:`abort` (no collective), kept for scripts written against it."""
        self.abort(why)


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
