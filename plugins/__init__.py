"""What plugs into the ckptbus core: trigger sources (``sources``), how checkpoints are written (``saving``),
the adapters to training frameworks (``integrations``) and the runtime they share.

``DynamicCheckpoint`` and ``release`` are imported lazily so that importing
one trigger source does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .integrations.accelerate_loop import DynamicCheckpoint
    from .integrations.release import release

__all__ = ["DynamicCheckpoint", "release"]


def __getattr__(name: str) -> Any:
    if name == "DynamicCheckpoint":
        from .integrations.accelerate_loop import DynamicCheckpoint

        return DynamicCheckpoint
    if name == "release":
        from .integrations.release import release

        return release
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
