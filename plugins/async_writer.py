"""Asynchronous full saves: a snapshot in host memory on the training thread, the files from a writer thread.

:meth:`HostSnapshot.take` runs on the training thread at the agreed step and
copies exactly what ``accelerator.save_state`` would write (model and
optimizer state dicts, scheduler, sampler and dataloader states, the
gradient scaler, objects registered for checkpointing, and this rank's RNG
states) into host memory. Tensors are copied with ``copy_`` into buffers
allocated at the first save and reused by every later one: fresh memory
costs page faults (measured: ``clone()`` of a 566 MB state took 0.4-1.1 s,
``copy_`` into reused buffers 45 ms). Only one save is in flight at a time,
so the writer of the previous save is done with the buffers before they are
overwritten.

:class:`WriteJob` writes those copies into the staging directory with
accelerate's own ``save`` (same file names and formats as
``checkpointing.save_accelerator_state``, so ``accelerator.load_state``
loads the result) and fsyncs them. The writer thread runs no collective,
ever: the ranks agree that every write finished on the training thread (see
``AccelerateSink.poll``).
"""

from __future__ import annotations

import copy
import os
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, save

# What async saves support; anything else (FSDP, DeepSpeed, XLA, other devices) saves synchronously.
_ASYNC_TYPES = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
_ASYNC_DEVICES = ("cpu", "cuda")


def async_unsupported(accelerator: Accelerator) -> str | None:
    """Why this run cannot save asynchronously (None if it can): the save then stays synchronous."""
    if accelerator.distributed_type not in _ASYNC_TYPES:
        return f"distributed type {accelerator.distributed_type} saves through its own engine"
    if accelerator.device.type not in _ASYNC_DEVICES:
        return f"device {accelerator.device.type} is not cpu or cuda"
    if getattr(accelerator, "_save_model_state_pre_hook", None):
        return "a save_state pre-hook is registered (it expects to write into the checkpoint itself)"
    return None


def _writes_shared_files(accelerator: Accelerator) -> bool:
    """Whether this rank writes the model, optimizer and scheduler files (accelerate's ``save`` rule)."""
    if accelerator.project_configuration.save_on_each_node:
        return bool(accelerator.is_local_main_process)
    return bool(accelerator.is_main_process)


@dataclass(slots=True)
class Snapshot:
    """One rank's copy of the state of one step, with the file each part goes to."""

    shared: list[tuple[str, Any, bool]] = field(default_factory=list)
    """(file name, object, safetensors?) written through accelerate's ``save`` (main process, or local main)."""
    own: list[tuple[str, Any]] = field(default_factory=list)
    """(file name, object) that every rank writes with ``torch.save`` (RNG states, scaler, dataloader state)."""
    save_on_each_node: bool = False


class HostSnapshot:
    """Copies state into host memory; tensor buffers are allocated once and reused (see the module docstring)."""

    __slots__ = ("_buffers",)

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        """Host memory held by the buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def take(self, accelerator: Accelerator, *, safe_serialization: bool = True) -> Snapshot:
        """Copy what ``accelerator.save_state`` writes for this rank. Training thread, at a step boundary."""
        snap = Snapshot(save_on_each_node=bool(accelerator.project_configuration.save_on_each_node))
        shared = _writes_shared_files(accelerator)
        # File names as in accelerate.checkpointing.save_accelerator_state.
        if shared:
            weights = "model.safetensors" if safe_serialization else "pytorch_model.bin"
            for i, model in enumerate(accelerator._models):
                name = weights if i == 0 else weights.replace(".", f"_{i}.")
                state = accelerator.get_state_dict(model, unwrap=False)
                snap.shared.append((name, self._copy(state, f"model{i}", {}), safe_serialization))
            for i, opt in enumerate(accelerator._optimizers):
                name = "optimizer.bin" if i == 0 else f"optimizer_{i}.bin"
                snap.shared.append((name, self._copy(opt.state_dict(), f"optimizer{i}", {}), False))
            for i, scheduler in enumerate(accelerator._schedulers):
                name = "scheduler.bin" if i == 0 else f"scheduler_{i}.bin"
                snap.shared.append((name, copy.deepcopy(scheduler.state_dict()), False))
            for i, obj in enumerate(accelerator._custom_objects):
                state = self._copy(obj.state_dict(), f"custom{i}", {})
                snap.shared.append((f"custom_checkpoint_{i}.pkl", state, False))
        from accelerate.data_loader import IterableDatasetShard, SeedableRandomSampler

        for i, loader in enumerate(accelerator._dataloaders):
            if shared and isinstance(loader.dataset, IterableDatasetShard):
                sampler = loader.get_sampler()
                if isinstance(sampler, SeedableRandomSampler):
                    name = "sampler.bin" if i == 0 else f"sampler_{i}.bin"
                    snap.shared.append((name, copy.deepcopy(sampler), False))
            if getattr(loader, "use_stateful_dataloader", False):
                name = "dl_state_dict.bin" if i == 0 else f"dl_state_dict_{i}.bin"
                snap.own.append((name, copy.deepcopy(loader.state_dict())))
        if accelerator.scaler is not None:
            snap.own.append(("scaler.pt", self._copy(accelerator.scaler.state_dict(), "scaler", {})))
        rng: dict[str, Any] = {
            "step": accelerator.step,
            "random_state": random.getstate(),
            "numpy_random_seed": np.random.get_state(),
            "torch_manual_seed": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            rng["torch_cuda_manual_seed"] = torch.cuda.get_rng_state_all()
        snap.own.append((f"random_states_{accelerator.process_index}.pkl", rng))
        return snap

    def _copy(self, obj: Any, key: str, memo: dict[tuple[Any, ...], torch.Tensor]) -> Any:
        if isinstance(obj, torch.Tensor):
            # Tensors that alias (GPT-2's tied embedding and lm_head) share one buffer, as in the source, so
            # safetensors stores them once, as save_state does.
            alias = (obj.device, obj.untyped_storage().data_ptr(), obj.storage_offset(), obj.shape, obj.stride())
            if obj.numel() and alias in memo:
                return memo[alias]
            buffer = self._buffers.get(key)
            if buffer is None or buffer.shape != obj.shape or buffer.dtype != obj.dtype:
                buffer = torch.empty(obj.shape, dtype=obj.dtype, device="cpu")
                self._buffers[key] = buffer
            buffer.copy_(obj.detach())
            memo[alias] = buffer
            return buffer
        if isinstance(obj, OrderedDict):
            return OrderedDict((k, self._copy(v, f"{key}/{k}", memo)) for k, v in obj.items())
        if isinstance(obj, dict):
            return {k: self._copy(v, f"{key}/{k}", memo) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self._copy(v, f"{key}/{i}", memo) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return tuple(self._copy(v, f"{key}/{i}", memo) for i, v in enumerate(obj))
        return copy.deepcopy(obj)


class WriteJob:
    """Writes one :class:`Snapshot` into ``staging`` on a daemon thread; no collectives.

    ``done`` is set when the thread ended; ``error`` then says why it failed (None: every file is written and
    fsynced). ``seconds`` is the time the thread took.
    """

    def __init__(self, snapshot: Snapshot, staging: Path) -> None:
        self.snapshot = snapshot
        self.staging = staging
        self.error: str | None = None
        self.seconds = 0.0
        self.done = threading.Event()
        # Daemon: an abort (a second Ctrl+C, an exception) must not wait for it; its staging is never committed.
        self._thread = threading.Thread(target=self._run, name=f"ckptbus-writer-{staging.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wait(self) -> None:
        self.done.wait()

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            written: list[Path] = []
            for name, obj, safe in self.snapshot.shared:
                path = self.staging / name
                save(obj, path, save_on_each_node=self.snapshot.save_on_each_node, safe_serialization=safe)
                written.append(path)
            for name, obj in self.snapshot.own:
                torch.save(obj, self.staging / name)
                written.append(self.staging / name)
            for path in written:
                if path.exists():  # accelerate's save writes shared files on one process only
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.seconds = time.perf_counter() - started
            self.done.set()
