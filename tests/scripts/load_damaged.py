"""Damage a real ``accelerator.save_state`` checkpoint in several ways and load each with ckptbus's loader.

    python load_damaged.py WORKDIR RESULT.json

One process, no launcher: ``Accelerator(cpu=True)``, a small model, AdamW, a
LambdaLR schedule. For every case the intact checkpoint is copied, damaged,
and loaded with ``load_checkpoint`` (plugins/integrations/load_state.py), as
``DynamicCheckpoint.resume`` does after verification; the manifest lists the
damaged files' sizes, as under ``verify: off`` or for a checkpoint written
before digests. RESULT maps each case to ``OK``, the CheckpointError's
message, or ``RAW <type>: <message>`` for anything else that escaped.
Started by tests/test_resume_integrity.py.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from ckptbus.plugins.integrations.load_state import load_checkpoint

from ckptbus import CheckpointError, Manifest
from ckptbus._layout import CheckpointInfo


def zero(path: Path, start: int, count: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(start)
        fh.write(b"\0" * count)


def fill_ff(path: Path) -> None:
    path.write_bytes(b"\xff" * path.stat().st_size)


def wrong_rng_state(path: Path) -> None:
    """A pickle that loads, holding an RNG state that cannot be set: accelerate logs it at INFO and goes on."""
    states = torch.load(path, weights_only=False)
    states["random_state"] = (3, (1, 2, 3), None)  # not a Mersenne Twister state: random.setstate raises
    torch.save(states, path)


CASES: dict[str, Callable[[Path], None]] = {
    "intact": lambda d: None,
    "model-header-zeroed": lambda d: zero(d / "model.safetensors", 0, 8),
    "model-all-zeros": lambda d: zero(d / "model.safetensors", 0, (d / "model.safetensors").stat().st_size),
    "optimizer-zip-header-zeroed": lambda d: zero(d / "optimizer.bin", 0, 64),
    "scheduler-all-zeros": lambda d: zero(d / "scheduler.bin", 0, (d / "scheduler.bin").stat().st_size),
    "rng-overwritten-ff": lambda d: fill_ff(d / "random_states_0.pkl"),
    "rng-state-unusable": lambda d: wrong_rng_state(d / "random_states_0.pkl"),
}


def info_of(directory: Path) -> CheckpointInfo:
    files = {p.name: p.stat().st_size for p in directory.iterdir() if p.is_file()}
    manifest = Manifest(step=1, kind="full", reason="schedule", created="x", world_size=1, files=files)
    return CheckpointInfo(directory, manifest)


def main() -> None:
    work, result_path = Path(sys.argv[1]), Path(sys.argv[2])
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    scheduler.step()
    intact = work / "intact-source"
    accelerator.save_state(str(intact))
    results: dict[str, str] = {}
    for case, damage in CASES.items():
        directory = work / case
        shutil.copytree(intact, directory)
        damage(directory)
        try:
            load_checkpoint(accelerator, info_of(directory))
            results[case] = "OK"
        except CheckpointError as exc:
            results[case] = str(exc)
        except Exception as exc:
            results[case] = f"RAW {type(exc).__name__}: {exc}"
    result_path.write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
