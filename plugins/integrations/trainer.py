"""DynamicCheckpointCallback: ckptbus for ``transformers.Trainer``.

    from ckptbus.plugins.hf_trainer import DynamicCheckpointCallback
    ckpt = DynamicCheckpointCallback.from_yaml("axolotl.yaml", ignore_unknown=True)   # or (config) / ()
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[ckpt])
    trainer.train(resume_from_checkpoint=ckpt.resume_checkpoint())
    sys.exit(ckpt.exit_code)

The trigger file, the signals and the socket publish on the same bus, and
the same runtime (plugins/runtime.py) runs the step protocol as under
:class:`~ckptbus.plugins.DynamicCheckpoint`; only the writing differs:
**the Trainer writes its own checkpoint** (plugins/saving/trainer_sink.py).
This callback translates the Trainer's events:

1. ``on_step_end`` (every rank, after each optimizer step): the runtime's
   step boundary. An agreed save sets ``control.should_save`` (plus
   ``control.should_training_stop`` when it asked to exit), so the Trainer
   writes ``<output_dir>/checkpoint-<step>`` right after, exactly as for its
   own ``save_steps``: resumable with ``trainer.train(resume_from_checkpoint=...)``.
   A weights save (Ctrl+C) is the Trainer's ``save_only_model`` for that one
   save: the model (gathered under FSDP/DeepSpeed as it always does), no
   optimizer state, which is quick. The last step always votes, so requests
   pending then are saved by the Trainer before it stops.
2. ``on_save`` (every rank, after the Trainer wrote its part): the runtime
   completes the save (the manifest ``ckptbus.json`` written last) and
   publishes ``save_completed`` (or ``save_failed``) with the request ids,
   which is when ``ckptbus request`` gets its reply. Saves the Trainer makes
   on its own (``save_strategy``) get a manifest and events too (reason
   ``schedule``).
3. ``on_train_end``: :meth:`DynamicCheckpointCallback.close`, without any
   collective: after the last step nothing more can be written, so requests
   that arrived since fail with "training ended".
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ckptbus import CheckpointConfig, ConfigError, SetupError
from ckptbus._config import build, read_yaml

from ..distributed import Ranks, TorchExchange, check_world, uses_nccl
from ..runtime import RunControls, Runtime
from ..saving.trainer_sink import TrainerSink
from .jit_checkpoint import sigterm_taken_from_jit

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
        self._sink = TrainerSink(torch_save_crc32=config.dynamic_checkpoint.torch_save_crc32)
        self._runtime = Runtime(config, self._sink, sources=sources)
        self.bus = self._runtime.bus
        """The run's bus: subscribe to ``save_completed`` and friends here (before or during training)."""

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
        self._runtime.close(serve=False)

    # -- Trainer events ------------------------------------------------------------

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self._adopt_output_dir(args)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self._adopt_output_dir(args)
        self._runtime.abort("training restarted")  # train() called again without on_train_end (an earlier call raised)
        world_size = int(args.world_size)
        check_world(
            world_size,
            seen_by="the Trainer",
            fix="pass TrainingArguments(use_cpu=True) (or set ACCELERATE_USE_CPU=1)",
        )
        self._sink.bind(args, control)
        device = args.device if uses_nccl() else torch.device("cpu")
        ranks = Ranks.of(
            TorchExchange.of(world_size, device),
            rank=int(args.process_index),
            local_rank=int(args.local_process_index),
            save_on_each_node=bool(args.save_on_each_node),
        )
        with sigterm_taken_from_jit(args, self.config):  # TrainingArguments.enable_jit_checkpoint (its module says)
            self._runtime.start(ranks, step=int(state.global_step))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if self._runtime.running:
            self._sink.bind(args, control)
            step = int(state.global_step)
            if self._runtime.step_boundary(step, force=step >= state.max_steps, framework_saves=control.should_save):
                control.should_training_stop = True

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if self._runtime.running:
            self._sink.bind(args, control)
            self._runtime.framework_saved(int(state.global_step))
            if self._runtime.stopped:
                control.should_training_stop = True

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.close()

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


__all__ = ["CONFIG_KEYS", "DynamicCheckpointCallback", "config_from_mapping"]
