"""transformers' ``TrainingArguments(enable_jit_checkpoint=True)`` next to the ckptbus callback: ckptbus takes SIGTERM.

transformers has Just-In-Time checkpoints (5.24 and 5.25 alike): ``Trainer.__init__``
installs a SIGTERM handler (``transformers.trainer_jit_checkpoint.CheckpointManager``)
that starts a 3 s timer on each rank; when it fires, that rank calls
``Trainer._save_checkpoint`` at its next step boundary and stops, with a
``checkpoint-is-incomplete.txt`` sentinel in the folder until its own part
is written. The ranks do not agree on a step: each saves where its timer
found it, and a rank that reached the collective of another step waits.

Both on one SIGTERM would make two saves (ckptbus chains to a Python
handler installed before it). So, when ckptbus handles SIGTERM
(``dynamic_checkpoint.signals.sigterm`` is not ``none``), the callback puts
back the handler transformers replaced, before ckptbus installs its own, and
says so in one line: ckptbus's save is the one made (the same step on every
rank, a manifest, then every rank exits). transformers' callback stays
registered but is never asked for a checkpoint, and at the end of training
puts that same handler back. With ``sigterm: none`` transformers' JIT
checkpoint is left as it is, also with one line. benchmarks/preemption_compare.py
measures the two side by side (docs/trainer.md#enable_jit_checkpoint).
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ckptbus import CheckpointConfig

logger = logging.getLogger("ckptbus")

__all__ = ["JitTakeover", "sigterm_taken_from_jit", "take_over_sigterm"]


@dataclass(frozen=True, slots=True)
class JitTakeover:
    """What was done about ``enable_jit_checkpoint``; :meth:`report` logs it once logging is set up."""

    message: str = ""

    def report(self) -> None:
        if self.message:
            logger.info("ckptbus: %s", self.message)


def take_over_sigterm(args: Any, config: CheckpointConfig) -> JitTakeover:
    """Call on every rank before ckptbus installs its signal handlers (``on_train_begin``). See the module docstring.

    Puts back the SIGTERM handler transformers' JIT checkpoint replaced when
    ckptbus handles SIGTERM; returns what to log. Does nothing (and says
    nothing) when ``args`` has no ``enable_jit_checkpoint`` or it is off.
    """
    if not getattr(args, "enable_jit_checkpoint", False):
        return JitTakeover()
    dyn = config.dynamic_checkpoint
    if not dyn.enabled or dyn.signals.sigterm == "none":
        return JitTakeover(
            "TrainingArguments.enable_jit_checkpoint is on and ckptbus does not handle SIGTERM "
            "(dynamic_checkpoint.signals.sigterm: none): a SIGTERM gets transformers' JIT checkpoint, made by each "
            "rank on its own after 3 s, without a ckptbus manifest"
        )
    manager = _jit_manager(signal.getsignal(signal.SIGTERM))
    if manager is None:
        return JitTakeover(
            "TrainingArguments.enable_jit_checkpoint is on, but transformers' SIGTERM handler is not the one "
            "installed now (replaced since); ckptbus handles SIGTERM, and chains to the handler found"
        )
    signal.signal(signal.SIGTERM, manager._original_sigterm_handler)
    return JitTakeover(
        "TrainingArguments.enable_jit_checkpoint is on: ckptbus handles SIGTERM for this run instead of "
        f"transformers' JIT checkpoint (every rank saves a {dyn.signals.sigterm.split('_')[0]} checkpoint at the "
        "same step, with its manifest, then stops); set dynamic_checkpoint.signals.sigterm: none to keep "
        "transformers' own (docs/trainer.md#enable_jit_checkpoint)"
    )


@contextlib.contextmanager
def sigterm_taken_from_jit(args: Any, config: CheckpointConfig) -> Iterator[None]:
    """Around the start of ckptbus's runtime (which installs its signal handlers and sets up its logging): take
    SIGTERM over from transformers before it, say what was done once the run's logging is set up."""
    done = take_over_sigterm(args, config)
    yield
    done.report()


def _jit_manager(handler: object) -> Any:
    """transformers' ``CheckpointManager`` whose bound method ``handler`` is, or None."""
    owner = getattr(handler, "__self__", None)
    if owner is None or not type(owner).__module__.startswith("transformers."):
        return None
    if not hasattr(owner, "_original_sigterm_handler") or owner._original_sigterm_handler is None:
        return None
    return owner
