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
"""

from __future__ import annotations

import contextlib
import logging
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
    with _zero3_gathering(accelerator, model) as note:
        accelerator.save_model(model, str(directory), safe_serialization=True)
    if note and accelerator.is_main_process:
        logger.warning("ckptbus: %s", note)
    if is_committer:
        _save_model_config(accelerator, model, directory)
    return note


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


def _save_model_config(accelerator: Accelerator, model: torch.nn.Module, directory: Path) -> None:
    """Write config.json beside the weights so ``from_pretrained(checkpoint)`` works."""
    config = getattr(accelerator.unwrap_model(model), "config", None)
    if config is not None and callable(getattr(config, "save_pretrained", None)):
        config.save_pretrained(str(directory))
