"""DynamicCheckpointCallback: ckptbus for ``transformers.Trainer``.

    from ckptbus.plugins.hf_trainer import DynamicCheckpointCallback
    ckpt = DynamicCheckpointCallback.from_yaml("axolotl.yaml", ignore_unknown=True)   # or (config) / ()
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[ckpt])
    trainer.train(resume_from_checkpoint=ckpt.resume_checkpoint())
    sys.exit(ckpt.exit_code)

The trigger file, the signals and the socket publish on the same bus and the
same coordinator decides as with :class:`~ckptbus.plugins.DynamicCheckpoint`;
only the writing differs: **the Trainer writes its own checkpoint.**

1. ``on_step_end`` (every rank, after each optimizer step): the sources are
   polled and, at a due step, the ranks vote. An agreed save publishes
   ``save_started`` and sets ``control.should_save`` (plus
   ``control.should_training_stop`` when it asked to exit), so the Trainer
   writes ``<output_dir>/checkpoint-<step>`` right after, exactly as for its
   own ``save_steps``: resumable with ``trainer.train(resume_from_checkpoint=...)``.
   A weights save (Ctrl+C) sets ``args.save_only_model`` for that one save:
   the Trainer writes the model (gathered under FSDP/DeepSpeed as it always
   does) and no optimizer state, which is quick.
2. ``on_save`` (every rank, after the Trainer wrote its part): one collective
   makes sure every rank finished (each writes its own RNG state); the
   process that writes (``args.should_save``) fsyncs the files and writes the
   manifest ``ckptbus.json`` last; a second collective agrees on the outcome;
   ``save_completed`` (or ``save_failed``) is published on every rank with the
   request ids, which is when ``ckptbus request`` gets its reply. Saves the
   Trainer makes on its own (``save_strategy``) get a manifest and events too
   (reason ``schedule``).
3. ``on_train_end``: the sources stop; requests not yet served fail with
   "training ended". No collective runs there.

Unlike the accelerate sink, the Trainer writes in place, not into a staging
directory: ``checkpoint-<step>`` exists while it is written. ckptbus marks it
complete only with the manifest, written last, so :meth:`resume_checkpoint`,
``ckptbus list`` and rotation only ever see complete ones (the Trainer's own
``resume_from_checkpoint=True`` takes the newest folder, complete or not).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ckptbus import (
    Bus,
    CheckpointConfig,
    CheckpointError,
    ConfigError,
    EventLog,
    SaveCompleted,
    SaveFailed,
    SaveKind,
    SaveRequested,
    SaveStarted,
    SetupError,
)
from ckptbus._config import build, read_yaml
from ckptbus._coordinator import Coordinator, Decision, exit_status
from ckptbus._eventlog import EVENT_LOG_NAME
from ckptbus._layout import (
    MANIFEST_NAME,
    Manifest,
    checkpoint_path,
    fsync_tree,
    latest_full,
    read_checkpoint,
    rotate,
)
from ckptbus._source import TriggerSource, close_all

from .accelerate_sink import TorchExchange
from .file_trigger import FileTrigger
from .output_dir_layout import check_output_dir_layout
from .shared_votes import SharedVotes, open_votes
from .signals import SignalTrigger
from .torch_save_crc import torch_save_crc32
from .unix_socket import UnixSocketTrigger

logger = logging.getLogger("ckptbus")

CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(CheckpointConfig))
"""The top-level keys ckptbus reads from a config file (``from_yaml(..., ignore_unknown=True)`` keeps only these)."""

REASON_BYTES = 512
"""How much of a failed rank's error message travels to every rank."""

_UNSET_OUTPUT_DIR = "<from TrainingArguments.output_dir>"


def config_from_mapping(data: Mapping[str, Any], *, ignore_unknown: bool = False) -> tuple[CheckpointConfig, bool]:
    """A :class:`~ckptbus.CheckpointConfig` from a mapping; also whether ``output_dir`` was given.

    ``ignore_unknown``: keep only the ckptbus keys (:data:`CONFIG_KEYS`) of a
    larger config (an axolotl file); keys inside ``dynamic_checkpoint`` are
    always checked. Without ``output_dir`` the Trainer's is used. Raises
    :class:`~ckptbus.ConfigError`.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"config: expected a mapping of keys, got {data!r}")
    picked = {str(k): v for k, v in data.items() if not ignore_unknown or k in CONFIG_KEYS}
    given = picked.get("output_dir") is not None
    if not given:
        picked["output_dir"] = _UNSET_OUTPUT_DIR
    return build(CheckpointConfig, picked), given


class DynamicCheckpointCallback(TrainerCallback):
    """On-demand checkpoints for ``transformers.Trainer``. See the module docstring and docs/trainer.md.

    ``config``: a :class:`~ckptbus.CheckpointConfig`; a mapping of the same
    keys (``output_dir`` may be left out: the Trainer's is used;
    ``ignore_unknown=True`` skips keys that are not ckptbus's, as in an
    axolotl config); or None (on-demand checkpoints on, with the defaults).
    ``sources`` adds trigger sources of your own. Raises
    :class:`~ckptbus.ConfigError` for a bad key, before training starts.
    """

    def __init__(
        self,
        config: CheckpointConfig | Mapping[str, Any] | None = None,
        *,
        ignore_unknown: bool = False,
        sources: Iterable[TriggerSource] = (),
    ) -> None:
        if config is None:
            config = {"dynamic_checkpoint": {"enabled": True}}
        if isinstance(config, CheckpointConfig):
            self._output_dir_given = True
        else:
            config, self._output_dir_given = config_from_mapping(config, ignore_unknown=ignore_unknown)
        self.config = config
        self.bus = Bus()
        """The run's bus: subscribe to ``save_completed`` and friends here (before or during training)."""
        dyn = config.dynamic_checkpoint
        self._signals: SignalTrigger | None = None
        if dyn.enabled and any(action != "none" for action in dyn.signals.actions().values()):
            self._signals = SignalTrigger(
                self.bus, dyn.signals.actions(), debounce_seconds=dyn.signals.debounce_seconds
            )
        self._coordinator = Coordinator(
            self._exchange,
            check_interval=dyn.check_interval,
            save_steps=config.save_steps,
            every_step=self._signals is not None,  # a signal is honoured within one step
        )
        self.bus.subscribe("save_requested", self._coordinator.enqueue)
        self._extra_sources = list(sources)
        self._sources: list[TriggerSource] = []
        self._event_log: EventLog | None = None
        self._world_size = 1
        self._rank = 0
        self._votes: SharedVotes | None = None
        self._device = torch.device("cpu")
        self._running = False
        self._last_step = 0
        self._stop = False
        self._stop_signum = 0
        self._failed_save: SaveFailed | None = None
        self._saved: dict[int, SaveCompleted] = {}
        # The save agreed at on_step_end and waiting for the Trainer's on_save: (decision, kind, started).
        self._pending: tuple[Decision, SaveKind, float] | None = None
        self._restore_save_only_model: bool | None = None
        self._save_settings = contextlib.ExitStack()  # what an agreed save switched until the Trainer saved
        self._args: TrainingArguments | None = None

    @classmethod
    def from_yaml(
        cls, path: str | os.PathLike[str], *, ignore_unknown: bool = False, sources: Iterable[TriggerSource] = ()
    ) -> DynamicCheckpointCallback:
        """Read the ckptbus keys of a YAML file (an axolotl config works unchanged with ``ignore_unknown=True``).

        Raises :class:`~ckptbus.ConfigError` naming the file and the key.
        """
        data = read_yaml(path)
        try:
            config, given = config_from_mapping(data, ignore_unknown=ignore_unknown)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        callback = cls(config, sources=sources)
        callback._output_dir_given = given
        return callback

    # -- what scripts read -------------------------------------------------------

    @property
    def output_dir(self) -> Path:
        """Where checkpoints, the trigger file and the socket live (the Trainer's ``output_dir`` unless given)."""
        if self.config.output_dir == _UNSET_OUTPUT_DIR:
            raise SetupError(
                "output_dir is not known yet: give it in the ckptbus config, or create the Trainer with this "
                "callback first (it takes TrainingArguments.output_dir)"
            )
        return Path(self.config.output_dir)

    @property
    def exit_code(self) -> int:
        """``128 + signal number`` after a stop asked for by a signal, 1 after a stop because a save failed
        (``on_save_failure: stop``), else 0. End the script with it: ``sys.exit(callback.exit_code)``."""
        return exit_status(self._stop, self._stop_signum, self._failed_save is not None)

    @property
    def should_stop(self) -> bool:
        """True once the ranks agreed to stop training."""
        return self._stop

    @property
    def last_checkpoint(self) -> SaveCompleted | None:
        """The newest checkpoint this run completed, or None."""
        return self._saved[max(self._saved)] if self._saved else None

    def request(self, kind: SaveKind = "full", *, label: str | None = None, exit_after: bool = False) -> str:
        """Ask for a checkpoint from any thread; returns the request id (served at the next vote)."""
        request = SaveRequested(kind=kind, reason="api", label=label, exit_after=exit_after)
        self.bus.publish(request)
        return request.request_id

    def status(self) -> dict[str, object]:
        """A snapshot for ``ckptbus status``; safe from any thread (it only reads)."""
        last = self.last_checkpoint
        return {
            "step": self._last_step,
            "last_checkpoint": last.path if last else None,
            "last_checkpoint_step": last.step if last else None,
            "pending_requests": self._coordinator.pending_count(),
            "world_size": self._world_size,
            "stopping": self._stop,
        }

    def resume_checkpoint(self, checkpoint: str | os.PathLike[str] | None = None) -> str | None:
        """What to pass to ``trainer.train(resume_from_checkpoint=...)``: a complete full checkpoint, or None.

        ``checkpoint``: a path, ``"latest"`` (the newest complete full
        checkpoint in ``output_dir``; None, with a log line, if there is
        none), or None for the config's ``resume_from_checkpoint``. Call it
        after creating the Trainer when ``output_dir`` comes from it. Raises
        :class:`~ckptbus.CheckpointError` for a path that is not a complete
        full checkpoint.
        """
        target = checkpoint if checkpoint is not None else self.config.resume_from_checkpoint
        if target is None:
            return None
        if os.fspath(target) == "latest":
            info = latest_full(self.output_dir)
            if info is None:
                logger.info(
                    "ckptbus: resume_from_checkpoint=latest: no complete full checkpoint in %s", self.output_dir
                )
                return None
        else:
            info = read_checkpoint(target)
            if info.manifest.kind != "full":
                raise CheckpointError(
                    f"{info.path} is a weights-only checkpoint (no optimizer state); it cannot resume training. "
                    "Pick a full checkpoint (`ckptbus list --output-dir ...` shows the kinds)."
                )
        logger.info("ckptbus: resuming from %s (step %d)", info.path, info.step)
        return str(info.path)

    def close(self) -> None:
        """Stop the sources and fail pending requests, without any collective. ``on_train_end`` calls it;
        call it yourself if ``trainer.train()`` raised and the process goes on. Safe to call twice."""
        if self._running:
            self._shutdown("training ended")

    # -- Trainer events ------------------------------------------------------------

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self._adopt_output_dir(args)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self._adopt_output_dir(args)
        if self._running:  # train() called again without on_train_end (an earlier call raised)
            self._shutdown("training restarted")
        self._start(args, state)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if not self._running:
            return
        step = int(state.global_step)
        self._last_step = step
        self._fail_unsaved(step, "the Trainer did not save at the agreed step")
        for source in self._sources:
            source.poll(step)
        # Votes happen at steps every rank computes alike; the last step always votes, so requests that arrived
        # since the previous vote are saved by the Trainer before it stops.
        decision = self._coordinator.decide(step, force=step >= state.max_steps)
        trainer_saves = bool(control.should_save)  # the Trainer's own save_strategy asked for this step
        if decision is not None:
            self._agreed(decision, args, control, trainer_saves)
        if control.should_save and args.should_save:
            # The Trainer rewrites in place: an old manifest of this step must not call the new files complete.
            (checkpoint_path(self.output_dir, step) / MANIFEST_NAME).unlink(missing_ok=True)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if not self._running:
            return
        step = int(state.global_step)
        self._put_back_save_settings()
        pending = self._pending if self._pending is not None and self._pending[0].step == step else None
        self._pending = None
        if pending is None:  # the Trainer's own save_strategy
            decision = Decision(step, "full", False, ("schedule",), ())
            kind: SaveKind = "weights" if args.save_only_model else "full"
            pending = (decision, kind, time.perf_counter())
            self.bus.publish(
                SaveStarted(path=str(checkpoint_path(self.output_dir, step)), **self._common(decision, kind))
            )
        outcome = self._finish(args, *pending)
        if isinstance(outcome, SaveCompleted):
            self._saved[step] = outcome
        elif self.config.dynamic_checkpoint.on_save_failure == "stop":
            self._stop = True
            self._failed_save = outcome
            control.should_training_stop = True

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------

    def _adopt_output_dir(self, args: TrainingArguments) -> None:
        trainer_dir = os.fspath(args.output_dir or "trainer_output")  # the Trainer's own default
        if not self._output_dir_given:
            self.config = dataclasses.replace(self.config, output_dir=trainer_dir)
            return
        if Path(self.config.output_dir).resolve() != Path(trainer_dir).resolve():
            raise SetupError(
                f"the ckptbus output_dir {self.config.output_dir!r} differs from TrainingArguments.output_dir "
                f"{trainer_dir!r}, where the Trainer writes its checkpoints; leave output_dir out of the ckptbus "
                "config or make the two the same"
            )

    def _start(self, args: TrainingArguments, state: TrainerState) -> None:
        self._args = args
        self._world_size = int(args.world_size)
        self._rank = int(args.process_index)
        if dist.is_available() and dist.is_initialized():
            if dist.get_world_size() != self._world_size:
                raise SetupError(
                    f"torch.distributed has {dist.get_world_size()} ranks but the Trainer sees {self._world_size} "
                    "process(es). On a machine without a GPU, pass TrainingArguments(use_cpu=True) (or set "
                    "ACCELERATE_USE_CPU=1) so that every rank takes part."
                )
            if dist.get_backend() == "nccl":
                self._device = args.device
        collective = TorchExchange.of(self._world_size, self._device)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        check_output_dir_layout(
            self.output_dir,
            collective,
            world_size=self._world_size,
            is_main=self._rank == 0,
            is_local_main=int(args.local_process_index) == 0,
            save_on_each_node=bool(args.save_on_each_node),
        )
        # Shared-memory and pipelined votes, as in DynamicCheckpoint (the world size is known only now).
        self._votes, votes = open_votes(self._rank, collective)
        self._coordinator.exchange = votes
        self._coordinator.start_exchange = votes.start if self._world_size > 1 else None
        main = self._rank == 0
        dyn = self.config.dynamic_checkpoint
        self._last_step = int(state.global_step)
        self._stop = False
        self._stop_signum = 0
        self._failed_save = None
        if dyn.event_log and main:
            self._event_log = EventLog(self.output_dir / EVENT_LOG_NAME).attach(self.bus)
        self._sources = []
        if dyn.enabled:
            self._sources.append(
                FileTrigger(
                    self.bus,
                    self.output_dir,
                    dyn.trigger_file_path,
                    check_interval=dyn.check_interval,
                    is_main_process=main,
                )
            )
        if self._signals is not None:
            self._sources.append(self._signals)
        if dyn.enabled and dyn.socket.enabled and main:
            self._sources.append(
                UnixSocketTrigger(
                    self.bus, self.output_dir, path=dyn.socket.path, timeout=dyn.socket.timeout, status=self.status
                )
            )
        self._sources.extend(self._extra_sources)
        self._running = True
        for source in self._sources:
            source.start()

    def _agreed(
        self, decision: Decision, args: TrainingArguments, control: TrainerControl, trainer_saves: bool
    ) -> None:
        """Every rank agreed on ``decision``: have the Trainer save this step (and stop, if asked)."""
        step = decision.step
        if decision.exit_after:
            self._stop = True
            self._stop_signum = self._stop_signum or decision.signum
            control.should_training_stop = True
        if trainer_saves and "schedule" not in decision.reasons:
            decision = dataclasses.replace(decision, reasons=("schedule", *decision.reasons))
        # A weights request alone saves the model only; a step the Trainer saves anyway keeps its full checkpoint.
        kind: SaveKind = (
            "weights" if args.save_only_model or (decision.kind == "weights" and not trainer_saves) else "full"
        )
        if kind == "weights" and not args.save_only_model:
            self._restore_save_only_model = False
            args.save_only_model = True
        # The Trainer's torch.save files of this save as DynamicCheckpoint writes them (plugins/torch_save_crc.py);
        # put back once the Trainer saved (on_save) or did not (_fail_unsaved).
        self._save_settings.enter_context(torch_save_crc32(self.config.dynamic_checkpoint.torch_save_crc32))
        self._pending = (decision, kind, time.perf_counter())
        control.should_save = True
        logger.debug("ckptbus: rank %d: the Trainer saves a %s checkpoint at step %d", self._rank, kind, step)
        self.bus.publish(SaveStarted(path=str(checkpoint_path(self.output_dir, step)), **self._common(decision, kind)))

    def _finish(
        self, args: TrainingArguments, decision: Decision, kind: SaveKind, started: float
    ) -> SaveCompleted | SaveFailed:
        """After the Trainer's save on every rank: agree, write the manifest last, agree, publish."""
        step = decision.step
        final = checkpoint_path(self.output_dir, step)
        committer = bool(args.should_save)
        nbytes = 0
        elapsed = 0.0

        def check() -> None:
            if committer and not final.is_dir():
                raise CheckpointError(f"the Trainer did not write {final}")

        def commit() -> None:
            nonlocal nbytes, elapsed
            if committer:
                elapsed = round(time.perf_counter() - started, 3)
                nbytes = _write_manifest(
                    final,
                    step=step,
                    kind=kind,
                    reason=decision.reason,
                    world_size=self._world_size,
                    labels=[r.label for r in decision.requests if r.label],
                    request_ids=[r.request_id for r in decision.requests],
                    # The Trainer saved synchronously: training was held for the whole save.
                    seconds=elapsed,
                    stall_seconds=elapsed,
                    write_seconds=elapsed,
                )

        for what, stage in (("writing", check), ("committing", commit)):
            error = self._run_agreed(what, stage)
            if error is not None:
                if committer:
                    (final / MANIFEST_NAME).unlink(missing_ok=True)
                if self._rank == 0:
                    logger.error("ckptbus: %s checkpoint at step %d failed: %s", kind, step, error)
                failed = SaveFailed(error=error, **self._common(decision, kind))
                self.bus.publish(failed)
                return failed
        if committer and self.config.save_total_limit is not None:
            try:
                for path in rotate(
                    self.output_dir,
                    self.config.save_total_limit,
                    on_demand=self.config.rotate_on_demand,
                    keep=(final,),
                ):
                    logger.info("ckptbus: save_total_limit=%d: deleted %s", self.config.save_total_limit, path)
            except OSError as exc:
                logger.warning("ckptbus: rotation failed (%s); older checkpoints are kept", exc)
        seconds = time.perf_counter() - started
        nbytes, elapsed_ms = self._exchange([nbytes, round(elapsed * 1000)])  # the committer's figures, on every rank
        if self._rank == 0:
            logger.info("ckptbus: saved %s checkpoint %s (%d bytes) in %.2f s", kind, final, nbytes, seconds)
        completed = SaveCompleted(
            path=str(final),
            bytes=nbytes,
            seconds=seconds,
            stall_seconds=elapsed_ms / 1000,
            write_seconds=elapsed_ms / 1000,
            **self._common(decision, kind),
        )
        self.bus.publish(completed)
        return completed

    def _run_agreed(self, what: str, stage: Callable[[], None]) -> str | None:
        """Run ``stage`` here, then agree with every rank (also the barrier): None if it worked everywhere."""
        error: str | None = None
        try:
            stage()
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            logger.error("ckptbus: rank %d: %s failed: %s", self._rank, what, error, exc_info=exc)
        failed_rank = self._exchange([self._rank + 1 if error is not None else 0])[0] - 1
        if failed_rank < 0:
            return None
        message = f"{what} failed on rank {failed_rank}: {error}".encode()[:REASON_BYTES]
        vote = [0] * REASON_BYTES
        if self._rank == failed_rank:
            vote[: len(message)] = message
        return bytes(b for b in self._exchange(vote) if b).decode("utf-8", "replace")

    def _exchange(self, vote: Sequence[int]) -> list[int]:
        """Element-wise maximum over all ranks (the coordinator's collective)."""
        return TorchExchange.of(self._world_size, self._device)(vote)

    def _common(self, decision: Decision, kind: SaveKind) -> dict[str, Any]:
        return {
            "step": decision.step,
            "kind": kind,
            "reasons": decision.reasons,
            "request_ids": tuple(r.request_id for r in decision.requests),
            "labels": tuple(r.label for r in decision.requests if r.label),
            "exit_after": decision.exit_after,
        }

    def _fail_unsaved(self, step: int, why: str) -> None:
        """An agreed save the Trainer never made (another callback cleared ``should_save``): report it failed."""
        if self._pending is None or self._pending[0].step >= step:
            return
        decision, kind, _ = self._pending
        self._pending = None
        self._put_back_save_settings()
        self.bus.publish(SaveFailed(error=why, **self._common(decision, kind)))

    def _put_back_save_settings(self) -> None:
        """Undo what one agreed save changed: ``save_only_model`` (a weights save), torch.save's CRC32 setting."""
        if self._restore_save_only_model is not None and self._args is not None:
            self._args.save_only_model = self._restore_save_only_model
        self._restore_save_only_model = None
        self._save_settings.close()

    def _shutdown(self, why: str) -> None:
        self._running = False
        self._fail_unsaved(self._last_step + 1, f"{why} before the Trainer saved")
        for request in self._coordinator.drain():
            self.bus.publish(SaveFailed.unserved(request, self._last_step, f"{why} before the request could be served"))
        close_all(self._sources)
        self._sources = []
        if self._votes is not None:
            self._votes.close()
            self._votes = None
        if self._event_log is not None:
            self._event_log.detach()
            self._event_log = None


def _write_manifest(directory: Path, **fields: Any) -> int:
    """fsync every file of ``directory``, then write ``ckptbus.json`` last (through a temporary file); return bytes."""
    (directory / MANIFEST_NAME).unlink(missing_ok=True)
    files = fsync_tree(directory)
    manifest = Manifest(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        files=files,
        bytes=sum(files.values()),
        **fields,
    )
    data = {**json.loads(manifest.to_json()), "writer": "transformers.Trainer"}
    tmp = directory / (MANIFEST_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(tmp, directory / MANIFEST_NAME)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return manifest.bytes


__all__ = ["CONFIG_KEYS", "DynamicCheckpointCallback", "config_from_mapping"]
