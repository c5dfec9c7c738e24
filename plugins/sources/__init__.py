"""Trigger sources: the trigger file, signals, the UNIX socket, the launcher watch. None of them imports torch
(a test checks).

Each keeps the :class:`ckptbus.TriggerSource` contract and declares its
traits as class attributes (``reason``; ``urgent``, True only for the
signals), read once when the runtime registers it
(:func:`ckptbus._source.register_source`).
"""

from __future__ import annotations

from typing import Final

from .file import FileTrigger
from .launcher import LauncherWatch
from .signals import SignalTrigger
from .unix_socket import UnixSocketTrigger

BUILTIN_SOURCES: Final[tuple[type, ...]] = (FileTrigger, SignalTrigger, LauncherWatch, UnixSocketTrigger)
"""The source classes ckptbus ships; the runtime builds those the config turns on."""

__all__ = ["BUILTIN_SOURCES", "FileTrigger", "LauncherWatch", "SignalTrigger", "UnixSocketTrigger"]
