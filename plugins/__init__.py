"""What plugs into the ckptbus core: trigger sources (``sources``), how checkpoints are written (``saving``),
the adapters to training frameworks (``integrations``) and the runtime they share.

``DynamicCheckpoint`` is imported lazily so that importing one trigger
source does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .integrations.accelerate_loop import DynamicCheckpoint

__all__ = ["DynamicCheckpoint"]


def __getattr__(name: str) -> Any:
    if name == "DynamicCheckpoint":
        from .integrations.accelerate_loop import DynamicCheckpoint

        return DynamicCheckpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
