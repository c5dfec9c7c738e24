"""DynamicCheckpoint: ckptbus for a hand-written accelerate training loop.

Adopting it takes three lines::

    from ckptbus.plugins import DynamicCheckpoint
    ckpt = DynamicCheckpoint(accelerator, "outputs/run1")      # or a CheckpointConfig
    ...
        optimizer.step(); scheduler.step(); optimizer.zero_grad()
        if ckpt.step(global_step):                              # True: training must stop
            break
    ckpt.close()
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

import torch
from accelerate import Accelerator

from ckptbus import (
    Bus,
    CheckpointConfig,
    CheckpointError,
    DynamicCheckpointConfig,
    EventLog,
    SaveCompleted,
    SaveFailed,
    SaveKind,
    SaveRequested,
)
from ckptbus._coordinator import Coordinator, Decision, exit_status
from ckptbus._eventlog import EVENT_LOG_NAME
from ckptbus._layout import CheckpointInfo, clean_leftovers, latest_full, read_checkpoint
from ckptbus._source import TriggerSource, close_all

from .accelerate_sink import AccelerateSink, TorchExchange, check_world
from .file_trigger import FileTrigger
from .output_dir_layout import check_output_dir_layout
from .shared_votes import open_votes
from .signals import SignalTrigger
from .unix_socket import UnixSocketTrigger

logger = logging.getLogger("ckptbus")


class DynamicCheckpoint:
    """Wires the bus, the trigger sources, the coordinator and the accelerate sink for one run.

    Create it on every rank after ``accelerator.prepare``; call :meth:`step`
    on every rank after each optimizer step, with the number of optimizer
    steps done so far; call :meth:`close` on every rank at the end (or use it
    as a context manager).

    ``config`` is a :class:`~ckptbus.CheckpointConfig`, or an output
    directory (on-demand checkpoints enabled with default settings).
    ``model`` is the model a weights checkpoint saves (default: the one
    model prepared by accelerate). ``sources`` adds trigger sources of your
    own to those the config enables.

    Raises :class:`~ckptbus.SetupError` if accelerate and torch.distributed
    disagree on the number of ranks.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        config: CheckpointConfig | str | os.PathLike[str],
        *,
        model: torch.nn.Module | None = None,
        sources: Iterable[TriggerSource] = (),
    ) -> None:
        if not isinstance(config, CheckpointConfig):
            config = CheckpointConfig(
                output_dir=os.fspath(config), dynamic_checkpoint=DynamicCheckpointConfig(enabled=True)
            )
        check_world(accelerator)
        self.accelerator = accelerator
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        exchange = TorchExchange(accelerator)
        check_output_dir_layout(
            self.output_dir,
            exchange,
            world_size=accelerator.num_processes,
            is_main=accelerator.is_main_process,
            is_local_main=accelerator.is_local_main_process,
            save_on_each_node=bool(accelerator.project_configuration.save_on_each_node),
        )
        self.bus = Bus()
        """The run's bus: subscribe to ``save_completed`` and friends here."""
        self._last_step = 0
        self._stop = False
        self._stop_signum = 0
        self._closed = False
        self._saved: dict[int, SaveCompleted] = {}

        dyn = config.dynamic_checkpoint
        self._event_log: EventLog | None = None
        if dyn.event_log and accelerator.is_main_process:
            self._event_log = EventLog(self.output_dir / EVENT_LOG_NAME).attach(self.bus)

        self._signals: SignalTrigger | None = None
        if dyn.enabled and any(action != "none" for action in dyn.signals.actions().values()):
            self._signals = SignalTrigger(
                self.bus, dyn.signals.actions(), debounce_seconds=dyn.signals.debounce_seconds
            )
        # Ranks on one machine vote through shared memory, between machines through a collective kept off the GPU
        # (plugins/shared_votes.py); with signals on they vote at every step, to honour a signal within a step.
        self._votes, votes = open_votes(accelerator.process_index, exchange)
        self._coordinator = Coordinator(
            votes,
            check_interval=dyn.check_interval,
            save_steps=config.save_steps,
            every_step=self._signals is not None,
            # Pipelined: a vote started at one step is read at the next, while it computes (Coordinator docs).
            start_exchange=votes.start if exchange.world_size > 1 else None,
        )
        self.bus.subscribe("save_requested", self._coordinator.enqueue)
        self._exchange = exchange
        self._failed_save: SaveFailed | None = None
        self._async_save = dyn.async_save
        self._sink = AccelerateSink(
            accelerator,
            self.bus,
            self.output_dir,
            exchange,
            model=model,
            save_total_limit=config.save_total_limit,
            rotate_on_demand=config.rotate_on_demand,
            torch_save_crc32=dyn.torch_save_crc32,
        )
        if self._async_save:
            why = self._sink.async_unsupported()
            if why is not None:
                self._async_save = False
                logger.warning("ckptbus: dynamic_checkpoint.async_save: %s; full saves stay synchronous", why)
        if self._sink.is_committer:
            for leftover in clean_leftovers(self.output_dir):
                logger.warning("ckptbus: removed %s, left by a save that was interrupted", leftover)

        self._sources: list[TriggerSource] = []
        if dyn.enabled:
            self._sources.append(
                FileTrigger(
                    self.bus,
                    self.output_dir,
                    dyn.trigger_file_path,
                    check_interval=dyn.check_interval,
                    is_main_process=accelerator.is_main_process,
                )
            )
        if self._signals is not None:
            self._sources.append(self._signals)
        if dyn.enabled and dyn.socket.enabled and accelerator.is_main_process:
            self._sources.append(
                UnixSocketTrigger(
                    self.bus, self.output_dir, path=dyn.socket.path, timeout=dyn.socket.timeout, status=self.status
                )
            )
        self._sources.extend(sources)
        for source in self._sources:
            source.start()

    # -- the training loop --------------------------------------------------

    def step(self, step: int) -> bool:
        """Call after every optimizer step, on every rank. Returns True when training must stop.

        ``step`` is the number of optimizer steps done (the global step);
        checkpoints are named after it. Under gradient accumulation, calls
        where accelerate did not sync gradients are ignored, so a save never
        lands in the middle of an accumulation.
        """
        if self._closed:
            raise RuntimeError("DynamicCheckpoint.step() called after close()")
        if not self.accelerator.sync_gradients:
            return False
        self._last_step = step
        for source in self._sources:
            source.poll(step)
        if self._sink.in_flight is not None:
            # An asynchronous save is being written: one small collective per step until it is committed. A
            # scheduled save must not be skipped, so at its step training waits for the one in flight.
            self._settle(self._sink.poll(wait=self._coordinator.is_scheduled(step)))
        if self._sink.in_flight is None and not self._stop:
            # While a save is in flight no new one is decided: requests stay pending until it is committed.
            decision = self._coordinator.decide(step)
            if decision is not None:
                self._carry_out(decision)
        return self._stop

    @property
    def should_stop(self) -> bool:
        """True once the ranks agreed to stop (after a save that asked to exit)."""
        return self._stop

    @property
    def stop_requested(self) -> bool:
        """True once training must stop, or a stopping signal reached this rank and waits for the next :meth:`step`.

        Needs no collective, so a long evaluation or inner loop may check it
        as often as it likes to cut rank-local work short; the ranks agree on
        the stop (and save) at the next :meth:`step`, which every rank must
        still reach.
        """
        return self._stop or (self._signals is not None and self._signals.stop_requested)

    @property
    def exit_code(self) -> int:
        """The exit status a script should end with: ``128 + signal number`` after a stop asked by a signal,
        1 after a stop because a save failed (``on_save_failure: stop``), else 0."""
        return exit_status(self._stop, self._stop_signum, self._failed_save is not None)

    @property
    def failed_save(self) -> SaveFailed | None:
        """The failed save that stopped training (``on_save_failure: stop``), or None."""
        return self._failed_save

    @property
    def last_step(self) -> int:
        """The step of the last :meth:`step` call (or the resumed step)."""
        return self._last_step

    @property
    def last_checkpoint(self) -> SaveCompleted | None:
        """The newest checkpoint this run completed, or None."""
        return self._saved[max(self._saved)] if self._saved else None

    def status(self) -> dict[str, object]:
        """A snapshot for status displays; safe to call from any thread (it only reads)."""
        last = self.last_checkpoint
        return {
            "step": self._last_step,
            "last_checkpoint": last.path if last else None,
            "last_checkpoint_step": last.step if last else None,
            "pending_requests": self._coordinator.pending_count(),
            "world_size": self.accelerator.num_processes,
            "stopping": self._stop,
        }

    def request(self, kind: SaveKind = "full", *, label: str | None = None, exit_after: bool = False) -> str:
        """Ask for a checkpoint from any thread; returns the request id.

        It is saved at the next step where ranks vote: within ``check_interval``
        steps, or while signals are handled at this step or the next (the
        vote is pipelined with several ranks); watch ``bus.save_completed``
        for the result.
        """
        request = SaveRequested(kind=kind, reason="api", label=label, exit_after=exit_after)
        self.bus.publish(request)
        return request.request_id

    def resume(self, checkpoint: str | os.PathLike[str] | None = None) -> int:
        """Load a full checkpoint with ``accelerator.load_state``; return its step (0 if nothing to resume).

        ``checkpoint`` is a path, ``"latest"`` (the newest complete full
        checkpoint in ``output_dir``; a fresh start, with a log line, if there
        is none), or None for the config's ``resume_from_checkpoint``. Only
        complete checkpoints (manifest written last, every listed file there)
        are taken. Call it on every rank: the ranks agree on the step before
        anything is loaded (with one ``output_dir`` per node, each node
        resolves ``latest`` in its own directory).

        Raises :class:`~ckptbus.CheckpointError` on every rank for a path
        that is not a complete checkpoint, a weights-only checkpoint, or when
        ranks found different checkpoints.
        """
        target = checkpoint if checkpoint is not None else self.config.resume_from_checkpoint
        if target is None:
            return 0
        info: CheckpointInfo | None = None
        error: CheckpointError | None = None
        try:
            info = self._resolve(os.fspath(target))
        except CheckpointError as exc:
            error = exc
        step = info.step if info is not None else -1
        highest, minus_lowest, failed = self._exchange([step, -step, int(error is not None)])
        if error is not None:
            raise error
        if failed:
            raise CheckpointError(f"resume from {os.fspath(target)!r} failed on another rank (see its log)")
        if highest != -minus_lowest:
            raise CheckpointError(
                f"ranks found different checkpoints for {os.fspath(target)!r} (steps {-minus_lowest} to {highest}): "
                "with one output_dir per node every node must hold the same checkpoints; pass the path of one "
                "that all nodes have"
            )
        if info is None:
            logger.info(
                "ckptbus: resume_from_checkpoint=latest: no complete full checkpoint in %s; starting fresh",
                self.output_dir,
            )
            return 0
        if info.manifest.world_size != self.accelerator.num_processes:
            logger.warning(
                "ckptbus: %s was saved by %d processes and this run has %d: the RNG state of every rank cannot be "
                "restored, so the run will not repeat an uninterrupted one exactly",
                info.path,
                info.manifest.world_size,
                self.accelerator.num_processes,
            )
        self.accelerator.load_state(str(info.path))
        self._last_step = info.step
        logger.info("ckptbus: resumed from %s at step %d", info.path, info.step)
        return info.step

    def _resolve(self, target: str) -> CheckpointInfo | None:
        """The complete full checkpoint ``target`` names (None: ``latest`` found none); raises CheckpointError."""
        if target == "latest":
            return latest_full(self.output_dir)
        info = read_checkpoint(target)
        if info.manifest.kind != "full":
            raise CheckpointError(
                f"{info.path} is a weights-only checkpoint (model.safetensors, no optimizer or RNG state); it "
                "cannot resume training. Pick a full checkpoint (`ckptbus list --output-dir ...` shows the kinds) "
                "or load these weights with from_pretrained."
            )
        return info

    # -- the end ------------------------------------------------------------

    def close(self) -> None:
        """End of training, on every rank: serve requests still pending, stop the sources.

        Pending requests from any rank are saved at the last step (this is a
        collective: every rank must call close). Safe to call twice.
        """
        if self._closed:
            return
        try:
            if self._signals is not None:
                self._signals.poll(self._last_step)  # a signal after the last step still gets its save
            self._settle(self._sink.poll(wait=True))  # an asynchronous save in flight is committed first
            decision = self._coordinator.decide(self._last_step, force=True, scheduled=False)
            if decision is not None:
                self._carry_out(decision)
        finally:
            self._shutdown("training ended")

    def abort(self, why: str = "training stopped with an error") -> None:
        """Release everything without any collective (for error paths); pending requests fail with ``why``."""
        if not self._closed:
            self._shutdown(why)

    def __enter__(self) -> DynamicCheckpoint:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
        else:
            self.abort(f"training stopped with {exc_type.__name__ if exc_type else 'an error'}")

    # -- internals ----------------------------------------------------------

    def _carry_out(self, decision: Decision) -> None:
        earlier = self._saved.get(decision.step)
        if earlier is not None and (earlier.kind == "full" or decision.kind == "weights"):
            # This step is already on disk in a kind that covers the request: answer with it.
            self.bus.publish(
                SaveCompleted(
                    step=decision.step,
                    kind=earlier.kind,
                    reasons=decision.reasons,
                    request_ids=tuple(r.request_id for r in decision.requests),
                    labels=tuple(r.label for r in decision.requests if r.label),
                    exit_after=decision.exit_after,
                    path=earlier.path,
                    bytes=earlier.bytes,
                    seconds=0.0,
                )
            )
        elif decision.kind == "full" and self._async_save and self._sink.async_unsupported() is None:
            # (Checked again here: a save_state pre-hook registered after start-up makes this save synchronous.)
            outcome: SaveCompleted | SaveFailed | None = self._sink.begin(decision)
            if outcome is None and decision.exit_after:
                outcome = self._sink.poll(wait=True)  # training stops at this step: the save must be committed
            self._settle(outcome)
        else:
            self._settle(self._sink.execute(decision))
        if decision.exit_after:
            self._stop = True
            self._stop_signum = self._stop_signum or decision.signum

    def _settle(self, outcome: SaveCompleted | SaveFailed | None) -> None:
        """Record the agreed outcome of a save (None: nothing ended yet)."""
        if isinstance(outcome, SaveCompleted):
            self._saved[outcome.step] = outcome
        elif outcome is not None and self.config.dynamic_checkpoint.on_save_failure == "stop":
            # Every rank got the same agreed outcome, so every rank stops at this step.
            self._stop = True
            self._failed_save = outcome

    def _shutdown(self, why: str) -> None:
        self._closed = True
        abandoned = self._sink.abandon()
        if abandoned is not None:
            self.bus.publish(
                SaveFailed(
                    **abandoned,
                    error=f"{why} before the checkpoint was committed; it was not made visible",
                )
            )
        for request in self._coordinator.drain():
            self.bus.publish(SaveFailed.unserved(request, self._last_step, f"{why} before the request could be served"))
        close_all(self._sources)
        if self._votes is not None:
            self._votes.close()
        if self._event_log is not None:
            self._event_log.detach()
