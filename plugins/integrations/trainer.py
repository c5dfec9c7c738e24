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

What it supplies to the runtime (plugins/runtime.py): where a step ends (``on_step_end``) and how a checkpoint is
written (the Trainer writes ``checkpoint-<step>`` itself; ckptbus adds the manifest).

Unlike the accelerate sink, the Trainer writes in place, not into a staging
directory: ``checkpoint-<step>`` exists while it is written. ckptbus marks it
complete only with the manifest, written last, so :meth:`resume_checkpoint`,
``ckptbus list`` and rotation only ever see complete ones (the Trainer's own
``resume_from_checkpoint=True`` takes the newest folder, complete or not).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ckptbus import CheckpointConfig, CheckpointError, ConfigError, SaveFailed, SaveKind, SaveStarted, SetupError
from ckptbus._config import build, read_yaml
from ckptbus._coordinator import Decision
from ckptbus._layout import MANIFEST_NAME, checkpoint_path, write_manifest

from ..distributed import TorchExchange, check_world, uses_nccl
from ..runtime import RunControls, Runtime
from ..saving.errors import apply_umask_modes
from ..saving.torch_save_crc import torch_save_crc32

logger = logging.getLogger("ckptbus")

CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(CheckpointConfig))
"""The top-level keys ckptbus reads from a config file (``from_yaml(..., ignore_unknown=True)`` keeps only these)."""

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
    try:
        return build(CheckpointConfig, picked), given
    except ConfigError as exc:
        foreign = sorted(k for k in picked if k not in CONFIG_KEYS)
        if not foreign:
            raise
        raise ConfigError(
            f"{exc}. If this is a larger config (an axolotl YAML, say) whose other keys are not ckptbus's, pass "
            f"ignore_unknown=True to read only ckptbus's keys (here {len(foreign)} other key(s): "
            f"{', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''})"
        ) from None


class DynamicCheckpointCallback(TrainerCallback, RunControls):
    """On-demand checkpoints for ``transformers.Trainer``. See the module docstring and docs/trainer.md.

    ``config``: a :class:`~ckptbus.CheckpointConfig`; a mapping of the same
    keys (``output_dir`` may be left out: the Trainer's is used;
    ``ignore_unknown=True`` skips keys that are not ckptbus's, as in an
    axolotl config); or None (on-demand checkpoints on, with the defaults).
    ``sources`` adds trigger sources of your own (see
    :class:`~ckptbus.TriggerSource`). Raises :class:`~ckptbus.ConfigError`
    for a bad key and :class:`~ckptbus.SetupError` for a source that is not
    one, before training starts.
    """

    def __init__(
        self,
        config: CheckpointConfig | Mapping[str, Any] | None = None,
        *,
        ignore_unknown: bool = False,
        sources: Iterable[object] = (),
    ) -> None:
        if config is None:
            config = {"dynamic_checkpoint": {"enabled": True}}
        if isinstance(config, CheckpointConfig):
            self._output_dir_given = True
        else:
            config, self._output_dir_given = config_from_mapping(config, ignore_unknown=ignore_unknown)
        self._runtime = Runtime(config, sources=sources)
        self.bus = self._runtime.bus
        """The run's bus: subscribe to ``save_completed`` and friends here (before or during training)."""
        # The save agreed at on_step_end and waiting for the Trainer's on_save: (decision, kind, started).
        self._pending: tuple[Decision, SaveKind, float] | None = None
        self._restore_save_only_model: bool | None = None
        self._save_settings = contextlib.ExitStack()  # what an agreed save switched until the Trainer saved
        self._args: TrainingArguments | None = None

    @classmethod
    def from_yaml(
        cls, path: str | os.PathLike[str], *, ignore_unknown: bool = False, sources: Iterable[object] = ()
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
    def config(self) -> CheckpointConfig:
        """The ckptbus settings of this run (``output_dir`` is the Trainer's once the Trainer was created)."""
        return self._runtime.config

    @property
    def output_dir(self) -> Path:
        """Where checkpoints, the trigger file and the socket live (the Trainer's ``output_dir`` unless given)."""
        if self.config.output_dir == _UNSET_OUTPUT_DIR:
            raise SetupError(
                "output_dir is not known yet: give it in the ckptbus config, or create the Trainer with this "
                "callback first (it takes TrainingArguments.output_dir)"
            )
        return self._runtime.output_dir

    def resume_checkpoint(self, checkpoint: str | os.PathLike[str] | None = None) -> str | None:
        """What to pass to ``trainer.train(resume_from_checkpoint=...)``: a complete full checkpoint, or None.

        ``checkpoint``: a path, ``"latest"`` (the newest complete full
        checkpoint in ``output_dir`` that passes verification; None, with a
        log line, if there is none at all), ``"latest_or_fresh"``, or None
        for the config's ``resume_from_checkpoint`` (docs/resume.md). Every
        file is checked against the manifest's sizes and digests
        (``dynamic_checkpoint.verify``) on every rank, before the Trainer
        loads anything. Call it after creating the Trainer when
        ``output_dir`` comes from it. Raises :class:`~ckptbus.CheckpointError`
        naming the checkpoint, the file and the cause for a path that is not
        a complete full checkpoint or fails verification, and under
        ``latest`` when checkpoints exist and none passes.
        """
        self.output_dir  # noqa: B018 (raises SetupError while output_dir is unknown)
        info = self._runtime.resolve_resume(checkpoint)
        if info is None:
            return None
        logger.info("ckptbus: resuming from %s (step %d)", info.path, info.step)
        return str(info.path)

    def close(self) -> None:
        """Stop the sources and fail pending requests, without any collective. ``on_train_end`` calls it;
        call it yourself if ``trainer.train()`` raised and the process goes on. Safe to call twice."""
        if self._runtime.running:
            self._shutdown("training ended")

    # -- Trainer events ------------------------------------------------------------

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self._adopt_output_dir(args)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self._adopt_output_dir(args)
        if self._runtime.running:  # train() called again without on_train_end (an earlier call raised)
            self._shutdown("training restarted")
        self._start(args, state)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        runtime = self._runtime
        if not runtime.running:
            return
        step = int(state.global_step)
        self._fail_unsaved(step, "the Trainer did not save at the agreed step")
        runtime.poll(step)
        # Votes happen at steps every rank computes alike; the last step always votes, so requests that arrived
        # since the previous vote are saved by the Trainer before it stops.
        decision = runtime.decide(step, force=step >= state.max_steps)
        trainer_saves = bool(control.should_save)  # the Trainer's own save_strategy asked for this step
        if decision is not None:
            self._agreed(decision, args, control, trainer_saves)
        if control.should_save and args.should_save:
            # The Trainer rewrites in place: an old manifest of this step must not call the new files complete.
            (checkpoint_path(self.output_dir, step) / MANIFEST_NAME).unlink(missing_ok=True)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if not self._runtime.running:
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
                SaveStarted(path=str(checkpoint_path(self.output_dir, step)), **decision.event_fields(kind))
            )
        self._finish(args, *pending)
        if self._runtime.stopped:
            control.should_training_stop = True

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------

    def _adopt_output_dir(self, args: TrainingArguments) -> None:
        trainer_dir = os.fspath(args.output_dir or "trainer_output")  # the Trainer's own default
        if not self._output_dir_given:
            self._runtime.config = dataclasses.replace(self.config, output_dir=trainer_dir)
            return
        if Path(self.config.output_dir).resolve() != Path(trainer_dir).resolve():
            raise SetupError(
                f"the ckptbus output_dir {self.config.output_dir!r} differs from TrainingArguments.output_dir "
                f"{trainer_dir!r}, where the Trainer writes its checkpoints; leave output_dir out of the ckptbus "
                "config or make the two the same"
            )

    def _start(self, args: TrainingArguments, state: TrainerState) -> None:
        self._args = args
        world_size = int(args.world_size)
        check_world(
            world_size,
            seen_by="the Trainer",
            fix="pass TrainingArguments(use_cpu=True) (or set ACCELERATE_USE_CPU=1)",
        )
        device = args.device if uses_nccl() else torch.device("cpu")
        self._runtime.start(
            TorchExchange.of(world_size, device),
            rank=int(args.process_index),
            local_rank=int(args.local_process_index),
            save_on_each_node=bool(args.save_on_each_node),
            step=int(state.global_step),
        )

    def _agreed(
        self, decision: Decision, args: TrainingArguments, control: TrainerControl, trainer_saves: bool
    ) -> None:
        """Every rank agreed on ``decision``: have the Trainer save this step (and stop, if asked)."""
        self._runtime.stop_after(decision)
        if decision.exit_after:
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
        # The Trainer's torch.save files of this save as DynamicCheckpoint writes them (saving/torch_save_crc.py);
        # put back once the Trainer saved (on_save) or did not (_fail_unsaved).
        self._save_settings.enter_context(torch_save_crc32(self.config.dynamic_checkpoint.torch_save_crc32))
        self._pending = (decision, kind, time.perf_counter())
        control.should_save = True
        logger.debug(
            "ckptbus: rank %d: the Trainer saves a %s checkpoint at step %d", self._runtime.rank, kind, decision.step
        )
        self.bus.publish(
            SaveStarted(path=str(checkpoint_path(self.output_dir, decision.step)), **decision.event_fields(kind))
        )

    def _finish(self, args: TrainingArguments, decision: Decision, kind: SaveKind, started: float) -> None:
        """After the Trainer's save on every rank: agree, write the manifest last, agree, publish."""
        runtime = self._runtime
        final = checkpoint_path(self.output_dir, decision.step)
        committer = bool(args.should_save)
        figures = (0, 0.0, 0.0)

        def check() -> None:
            if committer and not final.is_dir():
                raise CheckpointError(f"the Trainer did not write {final}")

        def commit() -> None:
            nonlocal figures
            if committer:
                elapsed = round(time.perf_counter() - started, 3)
                # The Trainer saved synchronously: training was held for the whole save.
                times = {"seconds": elapsed, "stall_seconds": elapsed, "write_seconds": elapsed}
                apply_umask_modes(final)  # one mode for every file the Trainer wrote; fsynced below
                manifest = write_manifest(final, {**runtime.manifest_fields(decision, kind), **times})
                figures = (manifest.bytes, elapsed, elapsed)

        for what, stage in (("writing", check), ("committing", commit)):
            error = runtime.agree(what, stage)
            if error is not None:
                if committer:
                    (final / MANIFEST_NAME).unlink(missing_ok=True)
                runtime.failed(decision, kind, error)
                return
        runtime.completed(decision, kind, final, committer=committer, figures=figures, started=started)

    def _fail_unsaved(self, step: int, why: str) -> None:
        """An agreed save the Trainer never made (another callback cleared ``should_save``): report it failed."""
        if self._pending is None or self._pending[0].step >= step:
            return
        decision, kind, _ = self._pending
        self._pending = None
        self._put_back_save_settings()
        self.bus.publish(SaveFailed(error=why, **decision.event_fields(kind)))

    def _put_back_save_settings(self) -> None:
        """Undo what one agreed save changed: ``save_only_model`` (a weights save), torch.save's CRC32 setting."""
        if self._restore_save_only_model is not None and self._args is not None:
            self._args.save_only_model = self._restore_save_only_model
        self._restore_save_only_model = None
        self._save_settings.close()

    def _shutdown(self, why: str) -> None:
        self._fail_unsaved(self._runtime.last_step + 1, f"{why} before the Trainer saved")
        self._runtime.shutdown(why)


__all__ = ["CONFIG_KEYS", "DynamicCheckpointCallback", "config_from_mapping"]
