"""Trigger sources: the trigger file, signals, the UNIX socket. None of them imports torch (a test checks)."""

from .file import FileTrigger
from .signals import SignalTrigger
from .unix_socket import UnixSocketTrigger

__all__ = ["FileTrigger", "SignalTrigger", "UnixSocketTrigger"]
