"""An append-only JSON-lines log of every bus event (``ckptbus-events.jsonl``)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from ._bus import SIGNAL_NAMES, Bus
from ._events import Event, event_to_dict

EVENT_LOG_NAME = "ckptbus-events.jsonl"


class EventLog:
    """Appends each event published on a bus as one JSON object per line.

    Each line has ``event`` (the type), ``time`` (unix seconds) and the
    event's fields. Lines are written with one ``write`` on a file opened in
    append mode, so readers never see half a line.
    """

    __slots__ = ("_bus", "_lock", "path")

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._bus: Bus | None = None

    def attach(self, bus: Bus) -> EventLog:
        """Subscribe to every signal of ``bus``; returns self."""
        for name in SIGNAL_NAMES:
            bus.subscribe(name, self.write)
        self._bus = bus
        return self

    def detach(self) -> None:
        """Unsubscribe from the bus given to :meth:`attach`."""
        if self._bus is not None:
            for name in SIGNAL_NAMES:
                self._bus.unsubscribe(name, self.write)
            self._bus = None

    def write(self, event: Event) -> None:
        line = json.dumps({"time": round(time.time(), 6), **event_to_dict(event)}, sort_keys=False) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
