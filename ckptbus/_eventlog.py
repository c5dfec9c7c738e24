"""An append-only JSON-lines log of every bus event (``ckptbus-events.jsonl``)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from ._bus import SIGNAL_NAMES, Bus, Subscription
from ._events import Event, event_to_dict

# Re-exported (``as``): the log's name was defined here once, and the runtime imports it from here.
from ._names import EVENT_LOG_NAME as EVENT_LOG_NAME


class EventLog:
    """Appends each event published on a bus as one JSON object per line.

    Each line has ``event`` (the type), ``time`` (unix seconds) and the
    event's fields. Lines are written with one ``write`` on a file opened in
    append mode, so readers never see half a line.
    """

    __slots__ = ("_lock", "_subscriptions", "path")

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._subscriptions: list[Subscription[[Event], None]] = []

    def attach(self, bus: Bus) -> EventLog:
        """Subscribe to every signal of ``bus``; returns self. Raises nothing."""
        self._subscriptions += [bus.subscribe(name, self.write) for name in SIGNAL_NAMES]
        return self

    def detach(self) -> None:
        """Unsubscribe from every bus given to :meth:`attach`; safe to call twice."""
        subscriptions, self._subscriptions = self._subscriptions, []
        for subscription in subscriptions:
            subscription.cancel()

    def write(self, event: Event) -> None:
        """Append ``event`` as one line. Raises :class:`OSError` if the file cannot be written (the bus logs it
        and reports it on ``receiver_failed``)."""
        line = json.dumps({"time": round(time.time(), 6), **event_to_dict(event)}, sort_keys=False) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
