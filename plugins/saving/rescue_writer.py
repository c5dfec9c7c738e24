"""A checkpoint written by one surviving rank alone, after another rank failed (plugins/rescue.py decides when).

Under replicated state (one process, DDP) the survivor holds the model,
optimizer, scheduler, sampler and registered objects of every rank; what it
lacks is each other rank's own RNG states. Those come from the copies every
rank keeps at each step boundary (plugins/rank_mirror.py), encoded here:

- :func:`encode_rank_state` runs at every step boundary, so it avoids pickling
  tensors and tuples of ints (measured: 0.7 ms for ``pickle`` of accelerate's
  RNG dict; the raw bytes below take a few tens of microseconds);
- :func:`decode_rank_state` gives back exactly the dict accelerate's
  ``save_state`` writes into ``random_states_<rank>.pkl``, so
  ``accelerator.load_state`` restores every rank as if it had saved itself.

:func:`write_alone` writes the files ``save_state`` (a full checkpoint) or
``save_model`` (weights) would write, with no collective: each digested as it
is written, like every other save.
"""

from __future__ import annotations

import array
import pickle
import random
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from accelerate import Accelerator

from ckptbus._events import SaveKind

from .async_writer import HostSnapshot, Snapshot, WriteJob
from .weights import save_model_config

_RNG_FILE = "random_states_{}.pkl"


def encode_rank_state(accelerator: Accelerator) -> bytes:
    """This rank's RNG states (and accelerate's step counter), as compact bytes (module docstring)."""
    version, internal, gauss = random.getstate()
    _, key, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True))
    cuda = [t.numpy().tobytes() for t in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None
    return pickle.dumps(
        (
            accelerator.step,
            version,
            array.array("Q", internal).tobytes(),
            gauss,
            key.tobytes(),
            pos,
            has_gauss,
            cached,
            torch.get_rng_state().numpy().tobytes(),
            cuda,
        ),
        protocol=pickle.HIGHEST_PROTOCOL,
    )


def decode_rank_state(data: bytes) -> dict[str, Any]:
    """The dict ``save_state`` writes into ``random_states_<rank>.pkl``, from :func:`encode_rank_state`'s bytes."""
    step, version, internal, gauss, key, pos, has_gauss, cached, cpu, cuda = pickle.loads(data)
    states: dict[str, Any] = {
        "step": step,
        "random_state": (version, tuple(array.array("Q", internal)), gauss),
        "numpy_random_seed": ("MT19937", np.frombuffer(key, dtype=np.uint32).copy(), pos, has_gauss, cached),
        "torch_manual_seed": torch.frombuffer(bytearray(cpu), dtype=torch.uint8),
    }
    if cuda is not None:
        states["torch_cuda_manual_seed"] = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in cuda]
    return states


def write_alone(
    accelerator: Accelerator,
    model: torch.nn.Module,
    staging: Path,
    kind: SaveKind,
    rank_states: Mapping[int, bytes],
) -> dict[str, str]:
    """Write a ``kind`` checkpoint into ``staging`` from this rank's live state and ``rank_states`` (rank ->
    :func:`encode_rank_state` bytes, one per rank); return the digest of each file. No collective."""
    if kind == "weights":
        return _write_weights(accelerator, model, staging)
    snapshot = HostSnapshot().take(accelerator, writes=None, copy=False)
    own = [(name, obj) for name, obj in snapshot.own if not name.startswith("random_states_")]
    own += [(_RNG_FILE.format(rank), decode_rank_state(data)) for rank, data in sorted(rank_states.items())]
    job = WriteJob(Snapshot(shared=snapshot.shared, own=own), staging)
    job.write()
    return job.digests


def _write_weights(accelerator: Accelerator, model: torch.nn.Module, staging: Path) -> dict[str, str]:
    """``model.safetensors`` and ``config.json``, as a weights save writes them; ``save_model`` itself writes on
    the main process only, which may be the rank that died."""
    state = OrderedDict(accelerator.get_state_dict(model))  # (tensors shared by two names are stored once)
    job = WriteJob(Snapshot(shared=[("model.safetensors", state, True)]), staging)
    job.write()
    save_model_config(accelerator, model, staging)
    return job.digests


__all__ = ["decode_rank_state", "encode_rank_state", "write_alone"]
