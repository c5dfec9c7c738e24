"""TEST-ONLY SHIM: lets axolotl run several ranks on a machine without a GPU. Never use it for real training.

axolotl 0.19 places the model of rank ``r`` on device ``r`` whenever
``WORLD_SIZE > 1`` (``normalize_config`` sets ``device_map = {"": LOCAL_RANK}``),
which has no meaning without an accelerator and fails while loading the
weights. This axolotl plugin, listed in the tests' YAML ``plugins:`` next to
ckptbus's, loads the model on the CPU instead; with ``ACCELERATE_USE_CPU=1``
the Trainer then runs every rank over gloo. It changes nothing where a GPU
is present.

The hook is ``load_datasets``: the first one axolotl calls with the
normalized config, before the model loader reads ``device_map``
(``pre_model_load`` comes too late for that). Returning None leaves the
datasets to axolotl.

A resume on several CPU ranks meets a bug of transformers 5.16 (the release
axolotl 0.19 requires; fixed in later ones): it loads the optimizer state
with ``map_location`` the rank's device, which accelerate gives as the
indexed ``cpu:0`` that ``torch.load`` cannot restore. ``post_trainer_create``
gives the Trainer's arguments the plain ``cpu`` instead.
"""

from __future__ import annotations

from typing import Any

import torch
from axolotl.integrations.base import BasePlugin


class CpuRanks(BasePlugin):  # type: ignore[misc]
    def load_datasets(self, cfg: Any, preprocess: bool = False) -> None:
        if not torch.cuda.is_available():
            cfg.device_map = {"": "cpu"}

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        device = trainer.args.device
        if device.type == "cpu" and device.index is not None:
            trainer.args.__dict__["_setup_devices"] = torch.device("cpu")  # the cached value behind args.device
