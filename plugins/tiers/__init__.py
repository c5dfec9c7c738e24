"""Tiers: where a checkpoint goes after its local commit (object storage: :mod:`.uploader`)."""

from .uploader import RemoteTier

__all__ = ["RemoteTier"]
