"""How a weights checkpoint is written: ``accelerator.save_model`` on every rank, and ``config.json`` beside it.

``save_model`` gathers the weights itself under DDP, FSDP and DeepSpeed
ZeRO-1/2. Under ZeRO-3 it gathers them only when the DeepSpeed config has
``stage3_gather_16bit_weights_on_model_save`` (accelerate's
``zero3_save_16bit_model``), which is off by default; otherwise it raises
"Cannot get 16bit model weights", and a Ctrl+C (whose save is a weights
checkpoint) would end the run with nothing saved. ckptbus gathers them all
the same, the way that setting does: DeepSpeed's consolidation, one layer at
a time onto rank 0 and into host memory, the parameters in the dtype they
train in. The files are those the setting would give (``model.safetensors``,
sharded if large), and the main process logs how the weights were gathered.

``save_model`` unwraps the model with accelerate's
``extract_model_from_parallel``, which imports DeepSpeed whenever it is
installed, to test whether the model is a ``DeepSpeedEngine``: 1.3 to 1.9 s
on the first save (the Ctrl+C one, usually) and two ``Setting accelerator to
CPU`` lines on a machine without a GPU, in a run that never uses DeepSpeed.
When DeepSpeed is not imported yet, no object can be a ``DeepSpeedEngine``,
so for that call ckptbus tells accelerate it is not installed: the answer is
the same, without the import. A run under DeepSpeed (or that imported it)
is left as it is. Measured (tests/test_weights_import.py prints it; 2 busy CPU
cores, a small GPT-2): the first weights save 0.01 s without the import,
0.7 to 1.9 s through accelerate's ``save_model`` with it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

logger = logging.getLogger("ckptbus")

ZERO3_GATHERED = (
    "DeepSpeed ZeRO-3 without zero3_save_16bit_model: the partitioned weights were gathered onto rank 0 "
    "with DeepSpeed's layer-by-layer consolidation (as zero3_save_16bit_model: true does)"
)


def save_weights(accelerator: Accelerator, model: torch.nn.Module, directory: Path, *, is_committer: bool) -> str:
    """Write ``model``'s weights (and its ``config.json``, for a transformers model) into ``directory``.

    Call it on every rank at the same time: under FSDP and DeepSpeed the
    weights are gathered with collectives. Returns a note on how the weights
    were gathered when it was not ``save_model``'s own way (else ``""``),
    which the main process has logged. Raises what ``save_model`` raises (an
    ``OSError`` of the writes, a collective's error).
    """
    with _deepspeed_left_unimported(accelerator):  # save_model and unwrap_model alike
        with _zero3_gathering(accelerator, model) as note:
            accelerator.save_model(model, str(directory), safe_serialization=True)
        if note and accelerator.is_main_process:
            logger.warning("ckptbus: %s", note)
        if is_committer:
            save_model_config(accelerator, model, directory)
    return note


def _deepspeed_not_loaded() -> bool:
    return False


class _UnimportedDeepSpeed:
    """Who is inside a save that keeps DeepSpeed unimported, so that the last one out puts accelerate's function
    back (saves may overlap: an asynchronous writer thread, the training thread)."""

    lock = threading.Lock()
    users = 0
    original: Any = None


@contextlib.contextmanager
def _deepspeed_left_unimported(accelerator: Accelerator) -> Iterator[None]:
    """While DeepSpeed is neither in use nor imported, keep ``save_model``'s unwrapping from importing it (see the
    module docstring). Scoped to the call; a version of accelerate without the function is left alone."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED or "deepspeed" in sys.modules:
        yield
        return
    from accelerate.utils import other

    state = _UnimportedDeepSpeed
    with state.lock:
        if state.users == 0:
            if not callable(getattr(other, "is_deepspeed_available", None)):
                state.original = None
            else:
                state.original = other.is_deepspeed_available
                other.is_deepspeed_available = _deepspeed_not_loaded
        state.users += 1
    try:
        yield
    finally:
        with state.lock:
            state.users -= 1
            if state.users == 0 and state.original is not None:
                other.is_deepspeed_available = state.original
                state.original = None


@contextlib.contextmanager
def _zero3_gathering(accelerator: Accelerator, model: Any) -> Iterator[str]:
    """Under ZeRO-3 without the 16-bit save, turn DeepSpeed's gathering on for this save only; yield a note."""
    config = _zero3_config_without_gathering(accelerator, model)
    if config is None:
        yield ""
        return
    # The engine reads this flag when accelerate asks for a state dict (zero_gather_16bit_weights_on_model_save);
    # set for this one call and put back, so the run's own save_model and save_checkpoint behave as configured.
    config.gather_16bit_weights_on_model_save = True
    try:
        yield ZERO3_GATHERED
    finally:
        config.gather_16bit_weights_on_model_save = False


def _zero3_config_without_gathering(accelerator: Accelerator, model: Any) -> Any:
    """The engine's ZeRO config when it partitions the weights and would refuse to gather them, else None."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    partitioned = getattr(model, "zero_optimization_partition_weights", None)
    gathers = getattr(model, "zero_gather_16bit_weights_on_model_save", None)
    if partitioned is None or gathers is None or not partitioned() or gathers():
        return None
    return model._config.zero_config


def save_model_config(accelerator: Accelerator, model: torch.nn.Module, directory: Path) -> None:
    """Write config.json beside the weights so ``from_pretrained(checkpoint)`` works."""
    config = getattr(accelerator.unwrap_model(model), "config", None)
    if config is not None and callable(getattr(config, "save_pretrained", None)):
        config.save_pretrained(str(directory))
