"""Every name ckptbus reserves on disk, spelled once.

Checkpoints, the manifest, the event log, the lock, the socket and the files
train.py writes all live in ``output_dir`` beside whatever else the user
keeps there. Every module imports these names from here instead of restating
them, so renaming one is one edit and the trigger-file check
(:data:`RESERVED_NAMES`) can never miss a file ckptbus writes
(tests/test_architecture.py checks that no other module spells one).

Standard library only, and nothing of ckptbus: every module may import it.
"""

from __future__ import annotations

from typing import Final

CHECKPOINT_PREFIX: Final = "checkpoint-"
"""A complete checkpoint is the directory ``<output_dir>/checkpoint-<step>``."""

MANIFEST_NAME: Final = "ckptbus.json"
"""The manifest inside every complete checkpoint, written last."""

PRIVATE_PREFIX: Final = ".ckptbus-"
"""The start of every hidden working name ckptbus gives an entry of ``output_dir`` (staging, trash, probes)."""

STAGING_PREFIX: Final = PRIVATE_PREFIX + "staging-"
"""A checkpoint being written: ``<output_dir>/.ckptbus-staging-checkpoint-<step>``, renamed once complete."""

RESCUE_STAGING_PREFIX: Final = STAGING_PREFIX + "rescue-"
"""A checkpoint a surviving rank writes alone after a failure: a staging name of its own, so that writers of an
abandoned save of the same step (still running on ranks about to exit) never write into it."""

TRASH_PREFIX: Final = PRIVATE_PREFIX + "trash-"
"""A checkpoint being deleted or replaced: renamed to this prefix first, so it stops being listed at once."""

PROBE_PREFIX: Final = PRIVATE_PREFIX + "probe-"
"""A file the main process writes for a moment to learn whether the other ranks see the same ``output_dir``."""

EVENT_LOG_NAME: Final = "ckptbus-events.jsonl"
"""The append-only log of every bus event (``dynamic_checkpoint.event_log``)."""

LOCK_NAME: Final = "ckptbus.lock"
"""The lock file that keeps a second run out of the same ``output_dir``."""

SOCKET_NAME: Final = "ckptbus.sock"
"""The UNIX socket ``ckptbus request`` and ``ckptbus status`` talk to."""

POINTER_NAME: Final = SOCKET_NAME + ".path"
"""Where the socket is when its path in ``output_dir`` is too long to bind (a file holding that path)."""

METRICS_NAME: Final = "metrics.jsonl"
"""train.py's (and the examples') one JSON object per optimizer step, with ``step`` and ``loss``."""

RESERVED_NAMES: Final = frozenset({MANIFEST_NAME, EVENT_LOG_NAME, METRICS_NAME, SOCKET_NAME, POINTER_NAME, LOCK_NAME})
"""Files ckptbus (and train.py) write into ``output_dir``: never a trigger file name."""

RESERVED_PREFIXES: Final = (CHECKPOINT_PREFIX, PRIVATE_PREFIX)
"""Starts of names ckptbus gives entries of ``output_dir``: never the start of a trigger file name."""

__all__ = [
    "CHECKPOINT_PREFIX",
    "EVENT_LOG_NAME",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "METRICS_NAME",
    "POINTER_NAME",
    "PRIVATE_PREFIX",
    "PROBE_PREFIX",
    "RESCUE_STAGING_PREFIX",
    "RESERVED_NAMES",
    "RESERVED_PREFIXES",
    "SOCKET_NAME",
    "STAGING_PREFIX",
    "TRASH_PREFIX",
]
