"""ckptbus: on-demand checkpoints for training runs launched with ``accelerate launch``.

The core (this package) imports no torch. The parts that plug into a run
(trigger sources, the accelerate sink, :class:`~ckptbus.plugins.DynamicCheckpoint`)
live in :mod:`ckptbus.plugins`; :class:`TriggerSource` is the contract a source of
your own keeps.
"""

from ._bus import SIGNAL_NAMES, Bus, Subscription
from ._config import CheckpointConfig, DynamicCheckpointConfig, load_config
from ._errors import CheckpointError, CkptbusError, ConfigError, RankFailure, SetupError
from ._eventlog import EventLog
from ._events import ReceiverFailed, SaveCompleted, SaveFailed, SaveKind, SaveRequested, SaveStarted
from ._layout import CheckpointInfo, Manifest, checkpoint_path, latest_full, list_checkpoints, read_checkpoint
from ._source import RunInfo, TriggerSource

__all__ = [
    "SIGNAL_NAMES",
    "Bus",
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointInfo",
    "CkptbusError",
    "ConfigError",
    "DynamicCheckpointConfig",
    "EventLog",
    "Manifest",
    "RankFailure",
    "ReceiverFailed",
    "RunInfo",
    "SaveCompleted",
    "SaveFailed",
    "SaveKind",
    "SaveRequested",
    "SaveStarted",
    "SetupError",
    "Subscription",
    "TriggerSource",
    "checkpoint_path",
    "latest_full",
    "list_checkpoints",
    "load_config",
    "read_checkpoint",
]
