"""DynamicCheckpoint: ckptbus for a hand-written accelerate training loop.

Adopting it takes three lines::

    from ckptbus.plugins import DynamicCheckpoint
    ckpt = DynamicCheckpoint(accelerator, "outputs/run1")      # or a CheckpointConfig
    ...
        optimizer.step(); scheduler.step(); optimizer.zero_grad()
        if ckpt.step(global_step):                              # True: training must stop
            break
    ckpt.close()

What it supplies to the runtime (plugins/runtime.py): where a step ends (:meth:`DynamicCheckpoint.step`), and how
a checkpoint is written (the staged accelerate save, plugins/saving/accelerate_sink.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from types import TracebackType

import torch
from accelerate import Accelerator

from ckptbus import CheckpointConfig, CheckpointError, DynamicCheckpointConfig
from ckptbus._coordinator import Decision
from ckptbus._layout import clean_leftovers

from ..distributed import TorchExchange, check_world
from ..runtime import RunControls, Runtime
from ..saving.accelerate_sink import AccelerateSink
from .load_state import load_checkpoint

logger = logging.getLogger("ckptbus")


class DynamicCheckpoint(RunControls):
    """On-demand checkpoints for one accelerate run.

    Create it on every rank after ``accelerator.prepare`` (it is a
    collective with several ranks); call :meth:`step` on every rank after
    each optimizer step, with the number of optimizer steps done so far; call
    :meth:`close` on every rank at the end (or use it as a context manager).

    ``config`` is a :class:`~ckptbus.CheckpointConfig`, or an output
    directory (on-demand checkpoints enabled with default settings).
    ``model`` is the model a weights checkpoint saves (default: the one
    model prepared by accelerate). ``sources`` adds trigger sources of your
    own (see :class:`~ckptbus.TriggerSource`) to those the config enables.

    Raises :class:`~ckptbus.SetupError` if accelerate and torch.distributed
    disagree on the number of ranks, or for an object in ``sources`` that is
    not a trigger source.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        config: CheckpointConfig | str | os.PathLike[str],
        *,
        model: torch.nn.Module | None = None,
        sources: Iterable[object] = (),
    ) -> None:
        if not isinstance(config, CheckpointConfig):
            config = CheckpointConfig(
                output_dir=os.fspath(config), dynamic_checkpoint=DynamicCheckpointConfig(enabled=True)
            )
        check_world(
            accelerator.num_processes,
            seen_by="the Accelerator",
            detail=f" (distributed type {accelerator.distributed_type})",
            fix="create the Accelerator with Accelerator(cpu=True) (or set ACCELERATE_USE_CPU=1)",
        )
        self.accelerator = accelerator
        self.config = config
        self._runtime = runtime = Runtime(config, sources=sources)
        self.bus = runtime.bus
        """The run's bus: subscribe to ``save_completed`` and friends here."""
        self.output_dir = runtime.output_dir
        self._closed = False
        runtime.start(
            TorchExchange(accelerator),
            rank=accelerator.process_index,
            local_rank=accelerator.local_process_index,
            save_on_each_node=bool(accelerator.project_configuration.save_on_each_node),
        )
        dyn = config.dynamic_checkpoint
        self._sink = AccelerateSink(
            accelerator,
            runtime,
            model=model,
            torch_save_crc32=dyn.torch_save_crc32,
            async_writer=dyn.async_writer,
        )
        self._async_save = dyn.async_save
        if self._async_save:
            why = self._sink.async_unsupported()
            if why is not None:
                self._async_save = False
                if accelerator.is_main_process:
                    logger.warning("ckptbus: dynamic_checkpoint.async_save: %s; full saves stay synchronous", why)
            elif dyn.async_writer == "process" and self._sink.has_cuda_state() and accelerator.is_main_process:
                logger.warning(
                    "ckptbus: async_writer: process reads CPU tensors only; a thread writes this run's saves"
                )
        if self._sink.is_committer:
            for leftover in clean_leftovers(self.output_dir):
                logger.warning("ckptbus: removed %s, left by a save that was interrupted", leftover)

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
        runtime = self._runtime
        runtime.poll(step)
        if self._sink.in_flight is not None:
            # An asynchronous save is being written: one small collective per step until it is committed. A
            # scheduled save must not be skipped, so at its step training waits for the one in flight.
            self._sink.poll(wait=runtime.coordinator.is_scheduled(step))
        if self._sink.in_flight is None and not runtime.stopped:
            # While a save is in flight no new one is decided: requests stay pending until it is committed.
            decision = runtime.decide(step)
            if decision is not None:
                self._carry_out(decision)
        return runtime.stopped

    def resume(self, checkpoint: str | os.PathLike[str] | None = None) -> int:
        """Load a full checkpoint with ``accelerator.load_state``; return its step (0 if nothing to resume).

        ``checkpoint`` is a path, ``"latest"`` (the newest complete full
        checkpoint in ``output_dir`` that passes verification; a fresh start,
        with a log line, if there is none at all), ``"latest_or_fresh"``, or
        None for the config's ``resume_from_checkpoint`` (docs/resume.md).
        Every file is checked against the manifest's sizes and digests before
        anything is loaded (``dynamic_checkpoint.verify``). Call it on every
        rank: the ranks agree on the step before anything is loaded (with one
        ``output_dir`` per node, each node resolves ``latest`` in its own
        directory), and on the outcome of loading.

        Raises :class:`~ckptbus.CheckpointError` on every rank, before
        training, for a path that is not a complete checkpoint, a weights-only
        checkpoint, a file that fails verification or does not load (named,
        with the cause), checkpoints under ``latest`` of which none passes,
        or when ranks found different checkpoints.
        """
        info = self._runtime.resolve_resume(checkpoint)
        if info is None:
            return 0
        error: CheckpointError | None = None
        try:
            load_checkpoint(self.accelerator, info)
        except CheckpointError as exc:
            error = exc
        self._runtime.loaded(info, error)  # a rank that could not load stops every rank
        logger.info("ckptbus: resumed from %s at step %d", info.path, info.step)
        return info.step

    # -- the end ------------------------------------------------------------

    def close(self) -> None:
        """End of training, on every rank: serve requests still pending, stop the sources.

        Pending requests from any rank are saved at the last step (this is a
        collective: every rank must call close). Safe to call twice.
        """
        if self._closed:
            return
        runtime = self._runtime
        try:
            if runtime.signals is not None:
                runtime.signals.poll(runtime.last_step)  # a signal after the last step still gets its save
            self._sink.poll(wait=True)  # an asynchronous save in flight is committed first
            decision = runtime.decide(runtime.last_step, force=True, scheduled=False)
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
        runtime = self._runtime
        if runtime.already_saved(decision) is not None:
            pass  # this step is already on disk in a kind that covers the request: answered with it
        elif decision.kind == "full" and self._async_save and self._sink.async_unsupported() is None:
            # (Checked again here: a save_state pre-hook registered after start-up makes this save synchronous.)
            if self._sink.begin(decision) is None and decision.exit_after:
                self._sink.poll(wait=True)  # training stops at this step: the save must be committed
        else:
            self._sink.execute(decision)
        runtime.stop_after(decision)

    def _shutdown(self, why: str) -> None:
        self._closed = True
        self._runtime.shutdown(why, abandoned=self._sink.abandon())
