"""CkptbusPlugin: ckptbus in axolotl runs, on axolotl's own plugin mechanism.

    plugins:
      - ckptbus.plugins.axolotl.CkptbusPlugin
    dynamic_checkpoint:
      enabled: true

axolotl trains with a ``transformers.Trainer``, so the work is done by the
Trainer callback (plugins/integrations/trainer.py) on the shared runtime.
This plugin only fits it to where axolotl differs:

1. **The config.** axolotl's ``dynamic_checkpoint`` block keeps axolotl's
   meaning: absent, ``null`` or ``enabled: false`` is off (the plugin then
   does nothing); the defaults are those axolotl applies, read from axolotl
   itself (0.19: ``check_interval`` 10 from its schema; an empty
   ``trigger_file_path`` is ``axolotl_checkpoint.save``). ckptbus's other keys of that block
   (``signals``, ``socket``, ``verify``, ...) go in a top-level ``ckptbus:``
   block, which axolotl's schema would otherwise drop; it is checked when
   the plugin is registered, before anything loads.
2. **One watcher of the trigger file.** axolotl adds its own callback for
   the same file; it deletes the file before the ranks agree. It is taken
   off the Trainer (``post_trainer_create``), so a touch is one save.
3. **Ctrl+C.** axolotl installs a SIGINT handler after every plugin hook,
   right before ``trainer.train()``; it writes the model into the root of
   ``output_dir`` and exits 0. When ckptbus handles SIGINT, the callback puts
   back the handler that was there before axolotl's (``on_train_begin``,
   before its signal source starts), so Ctrl+C is ckptbus's alone.
4. **The stop.** After a stop the ranks agreed on (Ctrl+C, SIGTERM,
   ``on_save_failure: stop``), ``post_train``, the hook axolotl calls right
   after ``trainer.train()`` returns, ends the process with the run's exit
   code (130 after Ctrl+C) before axolotl writes its final copy of the model.
5. **Resume.** ``resume_from_checkpoint: latest`` (or ``latest_or_fresh``)
   and ``auto_resume_from_checkpoints: true`` take the newest complete full
   checkpoint, verified; a checkpoint path with a ckptbus manifest is verified
   before the Trainer loads it. (axolotl's own rule takes the newest
   ``checkpoint-*`` folder: possibly half written, or weights only.)

docs/axolotl.md has the whole picture, side by side with axolotl's feature.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from axolotl.integrations.base import BasePlugin
from axolotl.utils.callbacks.dynamic_checkpoint import DEFAULT_TRIGGER_FILENAME
from axolotl.utils.callbacks.dynamic_checkpoint import DynamicCheckpointCallback as AxolotlTriggerWatcher
from axolotl.utils.distributed import cleanup_distributed
from axolotl.utils.schemas.dynamic_checkpoint import DynamicCheckpointConfig as AxolotlDynamicCheckpointSchema
from transformers import TrainerControl, TrainerState, TrainingArguments

from ckptbus import CheckpointConfig, ConfigError, DynamicCheckpointConfig
from ckptbus._config import build
from ckptbus._names import MANIFEST_NAME
from ckptbus._resume import LATEST, LATEST_OR_FRESH

from .trainer import DynamicCheckpointCallback

logger = logging.getLogger("ckptbus")

AXOLOTL_KEYS = ("enabled", "check_interval", "trigger_file_path")
"""The keys of ``dynamic_checkpoint`` that axolotl reads itself: they stay there, never in the ``ckptbus:`` block."""

AXOLOTL_CHECK_INTERVAL: int = AxolotlDynamicCheckpointSchema.model_fields["check_interval"].default
"""What axolotl's schema fills in for a ``dynamic_checkpoint`` block without ``check_interval``: 10 in axolotl
0.19 (its docs say 100, but the schema's value is what its callback receives)."""

AXOLOTL_TRIGGER_FILE: str = DEFAULT_TRIGGER_FILENAME
"""The file axolotl's callback watches when ``trigger_file_path`` is empty (its schema's default):
``axolotl_checkpoint.save`` in axolotl 0.19."""

CKPTBUS_BLOCK = "ckptbus"
"""The top-level key of an axolotl YAML that holds ckptbus's other ``dynamic_checkpoint`` keys."""

Handler = Any  # what signal.getsignal returns: a callable, SIG_DFL, SIG_IGN or None


def read_extra_block(raw: Mapping[str, Any]) -> DynamicCheckpointConfig:
    """ckptbus's own keys from the ``ckptbus:`` block of an axolotl config (the defaults where absent).

    Raises :class:`~ckptbus.ConfigError` naming ``ckptbus.<key>`` for an
    unknown key or a bad value, and for one of axolotl's keys written there.
    """
    block = raw.get(CKPTBUS_BLOCK)
    if block is None:
        return DynamicCheckpointConfig()
    if not isinstance(block, Mapping):
        raise ConfigError(f"config key '{CKPTBUS_BLOCK}': got {block!r}, expected a mapping of ckptbus keys")
    for key in AXOLOTL_KEYS:
        if key in block:
            raise ConfigError(
                f"config key '{CKPTBUS_BLOCK}.{key}' is axolotl's: write it under dynamic_checkpoint "
                f"(dynamic_checkpoint.{key}), where axolotl reads it"
            )
    return build(DynamicCheckpointConfig, block, prefix=f"{CKPTBUS_BLOCK}.")


def config_from_axolotl(cfg: Mapping[str, Any], extra: DynamicCheckpointConfig) -> CheckpointConfig | None:
    """The ckptbus config of an axolotl run (``cfg`` as axolotl validated it), or None when on-demand
    checkpoints are off there: ``dynamic_checkpoint`` absent, ``null`` or ``enabled: false``.

    Raises :class:`~ckptbus.ConfigError` for a value ckptbus cannot serve
    (a ``trigger_file_path`` with a folder in it, say).
    """
    block = cfg.get("dynamic_checkpoint")
    if not block or not block.get("enabled"):
        return None
    interval = block.get("check_interval")
    dynamic = dataclasses.replace(
        extra,
        enabled=True,
        check_interval=AXOLOTL_CHECK_INTERVAL if interval is None else interval,
        # axolotl's callback takes an empty name (its schema's default) as its default file.
        trigger_file_path=block.get("trigger_file_path") or AXOLOTL_TRIGGER_FILE,
    )
    # Scheduled saves, their rotation and resume stay axolotl's keys, applied by the Trainer.
    return CheckpointConfig(output_dir=str(cfg.get("output_dir")), dynamic_checkpoint=dynamic)


class _AxolotlsLogRule(logging.Filter):
    """ckptbus's records under axolotl's rule for its own (``AXOLOTL_LOG_LEVEL``, INFO by default), not the one
    for other libraries (``LOG_LEVEL``, WARNING by default): a saved checkpoint or a resume is this run's news.

    axolotl picks the rule by the logger's name, in a filter on its console handler and one on every logger
    created after its logging set-up ("ckptbus" included), so the record travels under ``axolotl.ckptbus``.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.name = "axolotl.ckptbus"
        return True


def _log_as_axolotls() -> None:
    if not any(isinstance(f, _AxolotlsLogRule) for f in logger.filters):
        logger.filters.insert(0, _AxolotlsLogRule())  # first: before axolotl's own filter on this logger judges


class AxolotlCheckpointCallback(DynamicCheckpointCallback):
    """The Trainer callback, taking Ctrl+C over from axolotl when training begins. See the module docstring."""

    def __init__(self, config: CheckpointConfig) -> None:
        super().__init__(config)
        # The handler before axolotl's: the plugin made this callback in an earlier hook than axolotl's
        # setup_signal_handler, on the main thread.
        self._sigint_before: Handler = signal.getsignal(signal.SIGINT)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if self.config.dynamic_checkpoint.signals.sigint != "none":
            self._disown_axolotl_sigint()
        super().on_train_begin(args, state, control, **kw)

    def _disown_axolotl_sigint(self) -> None:
        # ckptbus's signal source calls the handler it finds after recording the signal; axolotl's would write
        # the model mid-step on one rank and exit 0. Put back the one it replaced, which ckptbus then keeps.
        current = signal.getsignal(signal.SIGINT)
        if not _is_axolotls(current):
            return
        before = self._sigint_before
        # None: a handler installed outside Python, which cannot be put back; Python's own takes its place.
        signal.signal(signal.SIGINT, signal.default_int_handler if before is None else before)
        logger.info("ckptbus: Ctrl+C is handled by ckptbus (axolotl's own SIGINT handler is not called)")


def _is_axolotls(handler: Handler) -> bool:
    """Whether ``handler`` is the SIGINT handler axolotl's ``setup_signal_handler`` installs (defined there)."""
    return callable(handler) and getattr(handler, "__module__", None) == "axolotl.train"


class CkptbusPlugin(BasePlugin):  # type: ignore[misc]
    """ckptbus for axolotl: ``plugins: [ckptbus.plugins.axolotl.CkptbusPlugin]``. See the module docstring.

    Raises :class:`~ckptbus.ConfigError` at registration for a bad
    ``ckptbus:`` block, and before the Trainer is built for a
    ``dynamic_checkpoint`` value ckptbus cannot serve;
    :class:`~ckptbus.CheckpointError` for a resume target that is not a
    complete full checkpoint.
    """

    def __init__(self) -> None:
        super().__init__()
        self.extra = DynamicCheckpointConfig()
        self._extra_given = False
        self.callback: AxolotlCheckpointCallback | None = None
        """The run's callback once the Trainer is being built (None while dynamic_checkpoint is off)."""
        self._trainer: Any = None

    # -- axolotl's hooks, in the order axolotl calls them ---------------------------

    def register(self, cfg: Mapping[str, Any]) -> None:
        # The raw YAML: the only place the ckptbus block is seen (axolotl's schema drops keys it does not know).
        _log_as_axolotls()
        self.extra = read_extra_block(cfg)
        self._extra_given = cfg.get(CKPTBUS_BLOCK) is not None

    def add_callbacks_pre_trainer(self, cfg: Any, model: Any) -> list[Any]:
        config = config_from_axolotl(cfg, self.extra)
        if config is None:
            log = logger.warning if self._extra_given else logger.info
            log("ckptbus: dynamic_checkpoint is off in this config, so the plugin (and any ckptbus block) does nothing")
            return []
        self.callback = AxolotlCheckpointCallback(config)
        # Before the Trainer is built: axolotl's builder reads resume_from_checkpoint for its own callbacks.
        _resolve_resume(cfg, self.callback)
        return [self.callback]

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        if self.callback is None:
            return
        self._trainer = trainer
        # The file is ckptbus's now: axolotl's watcher would delete it before the ranks agree and save again.
        while trainer.pop_callback(AxolotlTriggerWatcher) is not None:
            logger.info("ckptbus: the trigger file is watched by ckptbus (axolotl's own watcher is removed)")

    def post_train(self, cfg: Any, model: Any) -> None:
        callback = self.callback
        if callback is None or not callback.should_stop:
            return
        code = callback.exit_code
        logger.warning(
            "ckptbus: every rank stopped at step %d; exiting with status %d without axolotl's final save "
            "(the checkpoint ckptbus saved holds the model)",
            callback.last_step,
            code,
        )
        self._release()
        sys.exit(code)

    def _release(self) -> None:
        # The DDP model before the process group: gloo can hang at exit otherwise.
        if self._trainer is not None:
            self._trainer.accelerator.free_memory()
            self._trainer = None
        cleanup_distributed()


def _resolve_resume(cfg: Any, callback: DynamicCheckpointCallback) -> None:
    """Point axolotl's ``resume_from_checkpoint`` at a complete full checkpoint chosen by ckptbus's rule.

    ``latest``/``latest_or_fresh`` (and ``auto_resume_from_checkpoints``
    without a target) resolve to the newest one that passes verification, or
    a fresh start; a path holding a ckptbus manifest is verified. Other paths
    (checkpoints axolotl wrote without ckptbus) are left to axolotl.
    """
    target = cfg.get("resume_from_checkpoint")
    auto = target is None and bool(cfg.get("auto_resume_from_checkpoints"))
    if target in (LATEST, LATEST_OR_FRESH) or auto:
        cfg["resume_from_checkpoint"] = callback.resume_checkpoint(target or LATEST)
        # axolotl's auto-resume would otherwise take the newest folder ckptbus passed over.
        cfg["auto_resume_from_checkpoints"] = False
    elif isinstance(target, str) and (Path(target) / MANIFEST_NAME).is_file():
        cfg["resume_from_checkpoint"] = callback.resume_checkpoint(target)


__all__ = [
    "AXOLOTL_CHECK_INTERVAL",
    "AXOLOTL_TRIGGER_FILE",
    "AxolotlCheckpointCallback",
    "CkptbusPlugin",
    "config_from_axolotl",
]
