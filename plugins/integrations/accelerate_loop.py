"""DynamicCheckpoint: ckptbus for a hand-written accelerate training loop.

Adopting it takes three lines::

    from ckptbus.plugins import DynamicCheckpoint
    ckpt = DynamicCheckpoint(accelerator, "outputs/run1")      # or a CheckpointConfig
    ...
        optimizer.step(); scheduler.step(); optimizer.zero_grad()
        if ckpt.step(global_step):                              # True: training must stop
            break
    ckpt.close()

It only translates: the runtime (plugins/runtime.py) owns the step protocol; this adapter tells it where a step
ends (:meth:`DynamicCheckpoint.step`) and hands it the sink that writes with accelerate
(plugins/saving/accelerate_sink.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from types import TracebackType

import torch
from accelerate import Accelerator

from ckptbus import CheckpointConfig, CheckpointError, DynamicCheckpointConfig

from ..distributed import Ranks, TorchExchange, check_world
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
        dyn = config.dynamic_checkpoint
        self.sink = AccelerateSink(
            accelerator,
            model=model,
            async_save=dyn.async_save,
            torch_save_crc32=dyn.torch_save_crc32,
            async_writer=dyn.async_writer,
        )
        """The sink writing this run's checkpoints; its diagnostics (``copy_wait_seconds``, ``hash_wait_seconds``)
        are read by the benchmarks."""
        self._runtime = Runtime(config, self.sink, sources=sources)
        self.bus = self._runtime.bus
        """The run's bus: subscribe to ``save_completed`` and friends here."""
        self.output_dir = self._runtime.output_dir
        self._runtime.start(
            Ranks.of(
                TorchExchange(accelerator),
                rank=accelerator.process_index,
                local_rank=accelerator.local_process_index,
                save_on_each_node=bool(accelerator.project_configuration.save_on_each_node),
            )
        )

    def step(self, step: int) -> bool:
        """Call after every optimizer step, on every rank. Returns True when training must stop.

        ``step`` is the number of optimizer steps done (the global step);
        checkpoints are named after it. Under gradient accumulation, calls
        where accelerate did not sync gradients are ignored, so a save never
        lands in the middle of an accumulation.
        """
        if not self._runtime.running:
            raise RuntimeError("DynamicCheckpoint.step() called after close()")
        return self.accelerator.sync_gradients and self._runtime.step_boundary(step)

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

    def close(self) -> None:
        """End of training, on every rank: serve requests still pending, stop the sources.

        Pending requests from any rank are saved at the last step (this is a
        collective: every rank must call close). Safe to call twice.
        """
        self._runtime.close()

    def abort(self, why: str = "training stopped with an error") -> None:
        """Release everything without any collective (for error paths); pending requests fail with ``why``."""
        self._runtime.abort(why)

    def __enter__(self) -> DynamicCheckpoint:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
        else:
            # The ranks still alive save the last step boundary (dynamic_checkpoint.on_error), then the exception
            # goes on: the traceback stays the user's.
            self._runtime.fail(exc)
