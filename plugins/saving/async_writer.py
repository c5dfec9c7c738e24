"""Asynchronous full saves: a snapshot in host memory on the training thread, the files from a writer thread.

:meth:`HostSnapshot.take` runs on the training thread at the agreed step and
takes exactly what ``accelerator.save_state`` would write (model and
optimizer state dicts, scheduler, sampler and dataloader states, the
gradient scaler, objects registered for checkpointing, and this rank's RNG
states). Tensors are copied with ``copy_`` into host buffers allocated at the
first save and reused by every later one: fresh memory costs page faults
(measured: ``clone()`` of a 566 MB state took 0.4-1.1 s, ``copy_`` into reused
buffers 45 ms). Only one save is in flight at a time, so the writer of the
previous save is done with the buffers before they are overwritten.

The bulk of the bytes, the parameters and the optimizer state, change only
in ``optimizer.step()``. Their copies are therefore *deferred*: the writer
thread makes them while the next forward and backward pass run, and a step
pre-hook on every optimizer holds ``optimizer.step()`` until they are done
(:meth:`WriteJob.wait_copied`). Everything else (buffers, which a forward
pass may update, RNG states, small objects) is copied at the agreed step. A
deferred tensor whose version counter moved while it was copied (an in-place
change outside ``optimizer.step()``) fails the save instead of writing a
torn state; a change through ``.data`` bypasses that counter and is not seen
(``async_save: false`` for such a loop). On CUDA the deferred copies run on
a stream of their own into pinned buffers, after an event recorded at the
agreed step, so they overlap the next step's kernels.

:class:`WriteJob` writes those copies into the staging directory with
accelerate's own ``save`` (same file names and formats as
``checkpointing.save_accelerator_state``, so ``accelerator.load_state``
loads the result) and fsyncs them. The writer thread runs no collective,
ever: the ranks agree that every write finished on the training thread (see
``AccelerateSink.poll``).
"""

from __future__ import annotations

import contextlib
import copy as copy_module
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from .errors import describe_write_error, free_bytes
from .file_writer import DigestingFile, save
from .torch_save_crc import torch_save_crc32

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


def _tensor_bytes(obj: Any, seen: set[tuple[int, int]]) -> int:
    """Bytes of the tensors in ``obj`` (aliases counted once): what its file will hold, near enough to plan."""
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), int(obj.storage_offset()))
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def plan_writers(sizes: dict[str, int], writers: int) -> dict[str, int]:
    """Which rank writes which shared file: largest first, each to the rank with the fewest bytes so far.

    Every rank computes the same plan from the same sizes (the state is
    replicated), so no plan is sent. Ties go to the lowest rank.
    """
    load = [0] * writers
    plan: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(range(writers), key=lambda r: (load[r], r))
        plan[name] = rank
        load[rank] += sizes[name]
    return plan


@dataclass(slots=True)
class Snapshot:
    """One rank's copy of the state of one step, with the file each part goes to."""

    shared: list[tuple[str, Any, bool]] = field(default_factory=list)
    """(file name, object, safetensors?) written through accelerate's ``save`` (main process, or local main)."""
    own: list[tuple[str, Any]] = field(default_factory=list)
    """(file name, object) that every rank writes with ``torch.save`` (RNG states, scaler, dataloader state)."""
    save_on_each_node: bool = False
    deferred: list[tuple[torch.Tensor, torch.Tensor, int, str]] = field(default_factory=list)
    """(host buffer, source, the source's version at the agreed step, name): copies the writer makes first."""
    ready: Any = None
    """A CUDA event recorded at the agreed step (the deferred copies wait for it), or None."""

    def copy_deferred(self) -> None:
        """Make the deferred copies (writer thread); raise if a source changed in place meanwhile."""
        if not self.deferred:
            return
        stream = None
        if self.ready is not None:
            device = next(source.device for _, source, _, _ in self.deferred if source.is_cuda)
            stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
            stream.wait_event(self.ready)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for buffer, source, _, _ in self.deferred:
                buffer.copy_(source, non_blocking=stream is not None)
        if stream is not None:
            stream.synchronize()
        for _, source, version, name in self.deferred:
            if source._version != version:
                raise RuntimeError(
                    f"{name} changed in place outside optimizer.step() while the asynchronous save copied it; "
                    "this checkpoint would mix two steps, so it was not made visible. Set "
                    "dynamic_checkpoint.async_save: false for this training loop"
                )


class HostSnapshot:
    """Copies state into host memory; tensor buffers are allocated once and reused (see the module docstring)."""

    __slots__ = ("_buffers",)

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        """Host memory held by the buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def take(
        self,
        accelerator: Accelerator,
        *,
        safe_serialization: bool = True,
        writes: set[str] | None = None,
        copy: bool = True,
    ) -> Snapshot:
        """What ``accelerator.save_state`` writes for this rank, at a step boundary on the training thread.

        ``writes``: the shared files (model, optimizer, scheduler, sampler,
        custom objects) this rank writes (see :func:`plan_writers`); None:
        all of them.
        ``copy``: copy into host buffers (an asynchronous save); False keeps
        the live objects, for a save written at once.
        """
        snap = Snapshot(
            save_on_each_node=bool(accelerator.project_configuration.save_on_each_node),
        )
        shared = self._shared_files(accelerator, safe_serialization)
        # Which rank writes which shared file is the sink's plan (plugins/saving/accelerate_sink.py); without one
        # this rank writes them all (one process, or a test).
        mine = {name for name, *_ in shared} if writes is None else writes
        for name, state, safe, key, deferrable in shared:
            if name in mine:
                snap.shared.append((name, self._copy(state, key, {}, snap, deferrable) if copy else state, safe))
        if snap.deferred and any(source.is_cuda for _, source, _, _ in snap.deferred):
            snap.ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
            snap.ready.record()  # on the current stream, after this step's optimizer kernels
        for i, loader in enumerate(accelerator._dataloaders):
            if getattr(loader, "use_stateful_dataloader", False):
                name = "dl_state_dict.bin" if i == 0 else f"dl_state_dict_{i}.bin"
                snap.own.append((name, copy_module.deepcopy(loader.state_dict())))
        if accelerator.scaler is not None:
            state = accelerator.scaler.state_dict()
            snap.own.append(("scaler.pt", self._copy(state, "scaler", {}) if copy else state))
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

    @classmethod
    def shared_sizes(cls, accelerator: Accelerator, *, safe_serialization: bool = True) -> dict[str, int]:
        """The tensor bytes of each file one rank writes for all (what a plan of writers is made from)."""
        return {
            name: _tensor_bytes(state, set()) for name, state, *_ in cls._shared_files(accelerator, safe_serialization)
        }

    @staticmethod
    def _shared_files(
        accelerator: Accelerator, safe_serialization: bool
    ) -> list[tuple[str, Any, bool, str, Callable[[torch.Tensor], bool]]]:
        """(file name, live state, safetensors?, buffer key, deferrable?) of the files one rank writes for all,
        named as in accelerate.checkpointing.save_accelerator_state."""
        files: list[tuple[str, Any, bool, str, Callable[[torch.Tensor], bool]]] = []
        weights = "model.safetensors" if safe_serialization else "pytorch_model.bin"
        parameters = {p.untyped_storage().data_ptr() for model in accelerator._models for p in model.parameters()}

        def is_parameter(t: torch.Tensor) -> bool:
            return t.untyped_storage().data_ptr() in parameters

        def never(t: torch.Tensor) -> bool:
            return False

        def always(t: torch.Tensor) -> bool:
            return True

        for i, model in enumerate(accelerator._models):
            name = weights if i == 0 else weights.replace(".", f"_{i}.")
            files.append(
                (name, accelerator.get_state_dict(model, unwrap=False), safe_serialization, f"model{i}", is_parameter)
            )
        for i, opt in enumerate(accelerator._optimizers):
            name = "optimizer.bin" if i == 0 else f"optimizer_{i}.bin"
            files.append((name, opt.state_dict(), False, f"optimizer{i}", always))
        for i, scheduler in enumerate(accelerator._schedulers):
            name = "scheduler.bin" if i == 0 else f"scheduler_{i}.bin"
            files.append((name, copy_module.deepcopy(scheduler.state_dict()), False, f"scheduler{i}", never))
        for i, obj in enumerate(accelerator._custom_objects):
            files.append((f"custom_checkpoint_{i}.pkl", obj.state_dict(), False, f"custom{i}", never))
        from accelerate.data_loader import IterableDatasetShard, SeedableRandomSampler

        for i, loader in enumerate(accelerator._dataloaders):
            if isinstance(loader.dataset, IterableDatasetShard):
                sampler = loader.get_sampler()
                if isinstance(sampler, SeedableRandomSampler):
                    name = "sampler.bin" if i == 0 else f"sampler_{i}.bin"
                    files.append((name, copy_module.deepcopy(sampler), False, f"sampler{i}", never))
        return files

    def _copy(
        self,
        obj: Any,
        key: str,
        memo: dict[tuple[Any, ...], torch.Tensor],
        snap: Snapshot | None = None,
        deferrable: Callable[[torch.Tensor], bool] = lambda t: False,
    ) -> Any:
        """Copy ``obj`` into host buffers; tensors that ``deferrable`` accepts are left to the writer (``snap``)."""
        if isinstance(obj, torch.Tensor):
            # Tensors that alias (GPT-2's tied embedding and lm_head) share one buffer, as in the source, so
            # safetensors stores them once, as save_state does.
            alias = (obj.device, obj.untyped_storage().data_ptr(), obj.storage_offset(), obj.shape, obj.stride())
            if obj.numel() and alias in memo:
                return memo[alias]
            buffer = self._buffers.get(key)
            if buffer is None or buffer.shape != obj.shape or buffer.dtype != obj.dtype:
                # Pinned host memory makes copies from the GPU asynchronous (and about twice as fast).
                buffer = torch.empty(obj.shape, dtype=obj.dtype, device="cpu", pin_memory=obj.is_cuda)
                self._buffers[key] = buffer
            if snap is not None and deferrable(obj):
                snap.deferred.append((buffer, obj.detach(), obj._version, key))
            else:
                buffer.copy_(obj.detach())
            memo[alias] = buffer
            return buffer
        if isinstance(obj, OrderedDict):
            return OrderedDict((k, self._copy(v, f"{key}/{k}", memo, snap, deferrable)) for k, v in obj.items())
        if isinstance(obj, dict):
            return {k: self._copy(v, f"{key}/{k}", memo, snap, deferrable) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self._copy(v, f"{key}/{i}", memo, snap, deferrable) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return tuple(self._copy(v, f"{key}/{i}", memo, snap, deferrable) for i, v in enumerate(obj))
        return copy_module.deepcopy(obj)


class WriteJob:
    """Writes one :class:`Snapshot` into ``staging`` on a daemon thread; no collectives.

    ``done`` is set when the thread ended; ``error`` then says why it failed (None: every file is written and
    fsynced). ``seconds`` is the time the thread took.
    """

    def __init__(
        self, snapshot: Snapshot, staging: Path, *, torch_save_crc32: bool = False, digest: bool = True
    ) -> None:
        self.snapshot = snapshot
        self.digest = digest
        self.staging = staging
        self.torch_save_crc32 = torch_save_crc32
        self.error: str | None = None
        self.seconds = 0.0
        self.free_before = free_bytes(staging)
        """Bytes free on the staging filesystem when the save began (a full disk's message says it)."""
        self.digests: dict[str, str] = {}
        """The digest of each file written so far (file name -> ``xxh3_128:...``)."""
        self.hash_wait_seconds = 0.0
        """Time the writing thread waited for digests (``DigestingFile.hash_wait_seconds``, summed)."""
        self.copied = threading.Event()
        """Set once the deferred copies are made (or failed): the state may change from then on."""
        self.done = threading.Event()
        # Daemon: an abort (a second Ctrl+C, an exception) must not wait for it; its staging is never committed.
        self._thread = threading.Thread(target=self._run, name=f"ckptbus-writer-{staging.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def who(self) -> str:
        """The writer, as messages name it."""
        return f"the writer thread {self._thread.name}"

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the writer to end, ``timeout`` seconds at most; whether it ended."""
        return self.done.wait(timeout)

    def give_up(self, why: str) -> None:
        """End the job as failed with ``why`` without waiting for the thread (it cannot be stopped from outside;
        it runs as a daemon, and whatever it still writes goes to a staging directory that is never committed)."""
        if not self.done.is_set():
            self.error = why
            self.copied.set()
            self.done.set()

    def wait_copied(self, limit: float | None = None) -> float:
        """Block until the deferred copies are made, ``limit`` seconds at most (then the job is given up: the save
        fails rather than training waiting for ever); return the seconds waited (training held)."""
        if self.copied.is_set():
            return 0.0
        started = time.perf_counter()
        if not self.copied.wait(limit):
            self.give_up(f"{self.who} did not copy the state within {limit:.0f} s; the save was given up")
        return time.perf_counter() - started

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            try:
                self.snapshot.copy_deferred()
            finally:
                self.copied.set()
            self.write()
        except Exception as exc:
            if not self.done.is_set():  # (a job given up keeps the reason it was given up for)
                room = describe_write_error(exc, self.staging, free_before=self.free_before)
                self.error = room or f"{type(exc).__name__}: {exc}"
        finally:
            self.seconds = time.perf_counter() - started
            self.copied.set()
            self.done.set()

    def write(self) -> None:
        """Write this rank's files, each fsynced and digested as it is written (:attr:`digests`).

        Runs on the writer thread, or on the training thread for a synchronous
        save (the snapshot then holds the live state). Raises what writing raised.
        """
        with torch_save_crc32(self.torch_save_crc32):  # see plugins/saving/torch_save_crc.py
            files = [(name, obj, safe) for name, obj, safe in self.snapshot.shared]
            files += [(name, obj, False) for name, obj in self.snapshot.own]
            for name, obj, safe in files:
                out = DigestingFile(self.staging / name, digest=self.digest)
                try:
                    save(obj, out, safe_serialization=safe)
                except BaseException:
                    out.close(fsync=False)
                    raise
                out.close()
                self.hash_wait_seconds += out.hash_wait_seconds
                if self.digest:
                    self.digests[name] = out.digester.value()
