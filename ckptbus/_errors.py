"""Exceptions raised by ckptbus.

The hierarchy, in full::

    CkptbusError                 base of everything ckptbus raises on purpose
    ├── ConfigError              a configuration key has a bad name, type or value
    ├── CheckpointError          a checkpoint on disk is missing, incomplete or of the wrong kind
    ├── SetupError               ckptbus was wired to a run it cannot serve (for example,
    │                            accelerate and torch.distributed disagree about the world size)
    └── RankFailure              a rank died or raised, so training cannot go on (says what was saved)

Every message names the problem and says what to do about it.
"""

from __future__ import annotations


class CkptbusError(Exception):
    """Base class of every error ckptbus raises on purpose."""


class ConfigError(CkptbusError, ValueError):
    """A configuration key has an unknown name, a wrong type or a value out of range."""


class CheckpointError(CkptbusError):
    """A checkpoint directory cannot be used for what was asked of it."""


class SetupError(CkptbusError, RuntimeError):
    """ckptbus was attached to a run it cannot serve correctly."""


class RankFailure(CkptbusError):
    """A rank died or stopped voting, so training cannot go on; the message says who, how, and what the ranks
    still alive saved (docs/crash.md)."""
