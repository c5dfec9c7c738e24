"""TEST-ONLY SHIM: accelerate's FSDP2 path on CPU ranks over gloo. Never part of ckptbus; never import it from ckptbus.

accelerate 1.15 takes the FSDP branch only for an accelerator device: on a
machine without one, ``accelerate launch --use_fsdp`` gives ranks whose
``Accelerator(cpu=True)`` is plain ``MULTI_CPU`` (DDP), silently. This
shim makes the ranks' Accelerator set, after its own start-up, what
``AcceleratorState`` would have set on GPUs: ``distributed_type = FSDP`` and
the FSDP plugin read from the launcher's environment. ``prepare`` then
shards the model with FSDP2's ``fully_shard`` over a CPU mesh, and
``save_state`` / ``load_state`` / ``save_model`` take their FSDP paths (the
sharded ``.distcp`` files, or the full state dict), which is what the
ckptbus tests need to check. Training speed, mixed precision and CPU
offload are out of its scope. A real FSDP run needs GPUs:
tests/manual/sharded_gpu_check.py checks it there.
"""

from __future__ import annotations

import os
from typing import Any

import accelerate
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin


class FsdpOnCpuRanks(accelerate.Accelerator):  # type: ignore[misc]
    """An Accelerator that turns the CPU ranks' DDP state into accelerate's FSDP state (test-only, see above)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # FSDP's plugin looks for an accelerator device to sync module states from; there is none on CPU ranks,
        # and every rank builds the same model from the same seed, so there is nothing to sync.
        os.environ["FSDP_SYNC_MODULE_STATES"] = "false"
        kwargs["cpu"] = True  # MULTI_CPU: the gloo process group that FSDP2 then shards over
        super().__init__(*args, **kwargs)
        if self.state.distributed_type != DistributedType.MULTI_CPU:
            raise RuntimeError(f"the FSDP CPU shim expects MULTI_CPU ranks, got {self.state.distributed_type}")
        # What AcceleratorState's FSDP branch sets on GPU ranks. It also writes the type into PartialState's shared
        # dict, which every later AcceleratorState() copies from: without that, the type is MULTI_CPU again at once.
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin()
        self.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def install() -> None:
    """Make ``from accelerate import Accelerator`` give :class:`FsdpOnCpuRanks` (before the script imports it)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        raise RuntimeError("the FSDP CPU shim needs accelerate launch's FSDP settings (ACCELERATE_USE_FSDP=true)")
    accelerate.Accelerator = FsdpOnCpuRanks
