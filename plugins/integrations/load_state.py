"""Load a full checkpoint with ``accelerator.load_state``; every failure a :class:`~ckptbus.CheckpointError`.

``load_state`` fails in the words of whatever library read the file
(``SafetensorError: Error while deserializing header``, ``PytorchStreamReader
failed reading zip archive``, an ``UnpicklingError``) without naming the
file, and it only logs (at INFO, on the main process) when the RNG state of
a rank cannot be restored, then trains on with a run that no longer repeats.
Here:

- this rank's ``random_states_<rank>.pkl`` is read first, as accelerate reads
  it, and after ``load_state`` the RNG states it holds must be the ones in
  force: a state that did not load is a refusal, not a log line;
- when ``load_state`` raises, each file of the checkpoint is opened on its
  own, in the order accelerate loads them, and the first that fails is named
  with its cause. If every file opens, the checkpoint is fine and this run's
  model or optimizer does not match the one that saved it: the refusal says so.

Digest verification (ckptbus/_verify.py) runs before this and catches
changed bytes; this module catches what verification cannot see (a
checkpoint written before digests, ``verify: sizes`` or ``off``, a model that
does not fit the checkpoint).
"""

from __future__ import annotations

import random
import zipfile
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import load as accelerate_load
from safetensors import safe_open

from ckptbus import CheckpointError
from ckptbus._contained import open_checkpoint_dir, unlisted_entries
from ckptbus._layout import CheckpointInfo

# The order in which load_state reads a checkpoint's files (accelerate/checkpointing.py).
_LOAD_ORDER = ("model", "pytorch_model", "optimizer", "scheduler", "sampler", "dl_state_dict", "scaler", "random")


def load_checkpoint(accelerator: Accelerator, info: CheckpointInfo) -> None:
    """``accelerator.load_state(info.path)`` on this rank. Raises :class:`~ckptbus.CheckpointError` naming the
    checkpoint, the file and the cause for anything that did not load, the RNG state of this rank included."""
    rng_file = info.path / f"random_states_{accelerator.process_index}.pkl"
    # Absent when the checkpoint was saved by fewer ranks: the runtime warns that RNG states cannot be restored.
    expected_rng = _read_rng_states(info, rng_file) if rng_file.name in info.manifest.files else None
    try:
        accelerator.load_state(str(info.path))
    except Exception as exc:
        raise _explain(info, exc) from None
    if expected_rng is not None:
        _check_rng_restored(info, rng_file, expected_rng)


def _read_rng_states(info: CheckpointInfo, path: Path) -> dict[str, Any]:
    try:
        states: Any = accelerate_load(path)
    except Exception as exc:
        raise _refusal(info, path.name, exc, "the RNG state of this rank") from None
    if not isinstance(states, dict):
        states = {}
    missing = [key for key in ("random_state", "torch_manual_seed") if key not in states]
    if missing:
        raise CheckpointError(
            f"cannot resume from {info.path}: {path.name} does not hold an RNG state (no {', '.join(missing)}); "
            "it is damaged or not accelerate's. Resume from another checkpoint (`ckptbus verify --output-dir "
            f"{info.path.parent}` checks them all)"
        )
    return dict(states)


def _check_rng_restored(info: CheckpointInfo, path: Path, states: dict[str, Any]) -> None:
    """accelerate swallows a failure to restore RNG states: compare what is in force with what the file holds."""
    restored = random.getstate() == states["random_state"] and torch.equal(
        torch.get_rng_state(), states["torch_manual_seed"]
    )
    cuda = states.get("torch_cuda_manual_seed")
    if restored and cuda is not None and torch.cuda.is_available():
        current = torch.cuda.get_rng_state_all()
        restored = len(current) == len(cuda) and all(
            torch.equal(a, b.cpu()) for a, b in zip(current, cuda, strict=True)
        )
    if not restored:
        raise CheckpointError(
            f"cannot resume from {info.path}: accelerator.load_state did not restore the RNG state in {path.name} "
            "(accelerate only logs that at INFO), so the run would not repeat an uninterrupted one. The file loads "
            "but does not hold a usable state: resume from another checkpoint"
        )


def _explain(info: CheckpointInfo, exc: Exception) -> CheckpointError:
    """The refusal for a load_state that raised ``exc``: the first file that does not load on its own, named."""
    for name in sorted(info.manifest.files, key=_load_rank):
        problem = _probe(info.path / name)
        if problem is not None:
            return _refusal(info, name, problem, "")
    cause = _first_line(exc)
    extra = _unlisted(info)
    if extra:
        # Verified before loading, so these appeared since: load_state reads files by name (and counts every
        # custom_checkpoint_<n>.pkl), so one of them, not the model, is what it tripped on.
        return CheckpointError(
            f"cannot resume from {info.path}: accelerator.load_state failed ({type(exc).__name__}: {cause}); the "
            f"checkpoint holds {', '.join(extra)}, which its manifest does not list (added after it was written "
            "and verified): remove it, or resume from another checkpoint"
        )
    return CheckpointError(
        f"cannot resume from {info.path}: accelerator.load_state failed ({type(exc).__name__}: {cause}), although "
        "every file of the checkpoint opens on its own: this run's model, optimizer, scheduler or registered "
        "objects (register_for_checkpointing) do not match the ones that saved it (another model config, other "
        "parameter groups, another number of models or custom objects?)"
    )


def _unlisted(info: CheckpointInfo) -> list[str]:
    """The entries of the checkpoint its manifest does not list (none if the directory cannot be read)."""
    try:
        with open_checkpoint_dir(info.path) as root:
            return [name for name, _ in unlisted_entries(root, info.manifest.files)]
    except (CheckpointError, OSError):
        return []


def _load_rank(name: str) -> tuple[int, str]:
    stem = Path(name).name
    for i, prefix in enumerate(_LOAD_ORDER):
        if stem.startswith(prefix):
            return i, name
    return len(_LOAD_ORDER), name


def _probe(path: Path) -> Exception | None:
    """Open one file as load_state would, cheaply (headers and pickles, tensors left on disk); its error or None."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as fh:  # parses and checks the header against the size
                fh.keys()
        elif path.suffix in (".bin", ".pt", ".pth", ".pkl"):
            if not zipfile.is_zipfile(path):
                return ValueError("not the zip archive torch.save writes (its header or directory is damaged)")
            try:
                accelerate_load(path, map_location="cpu", mmap=True)  # storages mapped, not read
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                accelerate_load(path, map_location="cpu")  # a record mmap cannot map: read it for the real cause
    except Exception as exc:
        return exc
    return None


def _refusal(info: CheckpointInfo, name: str, exc: Exception, what: str) -> CheckpointError:
    holds = f" ({what})" if what else ""
    return CheckpointError(
        f"cannot resume from {info.path}: {name}{holds} does not load: {type(exc).__name__}: {_first_line(exc)}. "
        f"The file is damaged; resume from another checkpoint (`ckptbus verify --output-dir {info.path.parent}` "
        "checks them all)"
    )


def _first_line(exc: Exception) -> str:
    """The cause in ``exc``'s words, short: torch's refusal of a pickle hides it below a page of advice."""
    text = str(exc)
    _, marker, rest = text.partition("WeightsUnpickler error:")
    if marker:
        detail = next((line.strip() for line in rest.splitlines() if line.strip()), "")
        return f"the pickle inside is unreadable ({detail})" if detail else "the pickle inside is unreadable"
    lines = text.strip().splitlines()
    return lines[0][:300] if lines else "(no message)"
