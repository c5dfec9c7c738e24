"""A trigger source written outside ckptbus, as a user would: a full checkpoint every N seconds.

It keeps the contract of ``ckptbus.TriggerSource`` and nothing more: built
with its own setting, given the bus and the run's facts at ``start``, looked
at every step boundary in ``poll``. It declares its reason, so the manifest
and the events say ``timer``. Used by tests/test_custom_source.py through the
hand-written accelerate loop (user_loop.py) and the Trainer (trainer_run.py).
"""

from __future__ import annotations

import time

from ckptbus import Bus, RunInfo, SaveRequested


class EverySeconds:
    reason = "timer"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._bus: Bus | None = None
        self._next = 0.0

    def start(self, bus: Bus, run: RunInfo) -> None:
        self._bus = bus
        self._next = time.monotonic() + self.seconds
        self.main = run.is_main_process

    def poll(self, step: int) -> None:
        # Only the main process asks: the ranks' clocks differ, and one request is saved on every rank anyway.
        if self._bus is not None and self.main and time.monotonic() >= self._next:
            self._next = time.monotonic() + self.seconds
            self._bus.publish(SaveRequested(kind="full", reason=self.reason, label=f"every {self.seconds:g} s"))

    def close(self) -> None:
        self._bus = None
