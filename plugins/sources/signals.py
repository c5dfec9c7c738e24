"""Signals: Ctrl+C and preemption signals ask every rank for a checkpoint, then (usually) a clean exit.

Each handled signal maps to an action (``dynamic_checkpoint.signals`` in the
config): ``weights_exit``, ``full_exit``, ``full_continue`` or ``none``
(not handled). The handler only records the signal; :meth:`SignalTrigger.poll`,
on the training thread at the next optimizer-step boundary, publishes
``SaveRequested(kind, reason="signal:<NAME>", exit_after=...)``. The ranks
vote at every step while signals are handled, so a signal that reached any
one rank is honoured by all of them at the same step.

A second *stopping* signal (one whose action ends in ``_exit``) that arrives
more than ``debounce_seconds`` after the first is a second press: the process
dies at once by that signal's default action, and the checkpoint being
written stays in its staging directory, never marked complete. Within
``debounce_seconds`` it is the same press delivered twice (a launcher that
forwards a signal the process also got from the terminal or the scheduler)
and only recorded.

Handlers are installed from the main thread only (elsewhere: a warning, no
handlers), never over a signal the process ignores (``nohup``), and are put
back by :meth:`SignalTrigger.close` unless somebody replaced them since. A
Python handler installed before ckptbus is called after ckptbus recorded the
signal; the interpreter's own SIGINT handler (``KeyboardInterrupt``) and the
default action are not, since they would end the step half done.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from types import FrameType
from typing import Any, Final

from ckptbus import Bus, SaveCompleted, SaveFailed, SaveKind, SaveRequested
from ckptbus._config import SIGNAL_ACTIONS, SignalAction
from ckptbus._source import RunInfo

logger = logging.getLogger("ckptbus")

Handler = Callable[[int, FrameType | None], Any] | int | None
"""What ``signal.getsignal`` returns: a callable, ``SIG_DFL``/``SIG_IGN``, or None (installed outside Python)."""


@dataclass(frozen=True, slots=True)
class _Plan:
    kind: SaveKind
    exit_after: bool


_PLANS: dict[SignalAction, _Plan | None] = {
    "weights_exit": _Plan("weights", True),
    "full_exit": _Plan("full", True),
    "full_continue": _Plan("full", False),
    "none": None,
}


def _parse_signal(name: str) -> signal.Signals:
    try:
        signum = signal.Signals[name]
    except KeyError:
        raise ValueError(f"unknown signal {name!r}; use a name such as 'SIGINT' or 'SIGTERM'") from None
    if signum in (signal.SIGKILL, signal.SIGSTOP):
        raise ValueError(f"{name} cannot be caught")
    return signum


class SignalTrigger:
    """Turns signals into coordinated save requests. See the module docstring.

    ``actions`` maps signal names (``"SIGINT"``) to actions (see
    :data:`ckptbus._config.SIGNAL_ACTIONS`); ``none`` leaves a signal alone.
    Raises ``ValueError`` for an unknown signal name or action.
    """

    reason: Final = "signal"
    urgent: Final = True
    """Ranks vote at every step while this source runs: a signal is honoured within a step or two."""

    def __init__(self, actions: Mapping[str, SignalAction], *, debounce_seconds: float = 1.0) -> None:
        self.bus = Bus()
        self.debounce_seconds = debounce_seconds
        self._plans: dict[int, _Plan] = {}
        for name, action in actions.items():
            signum = _parse_signal(name)
            if action not in _PLANS:
                raise ValueError(f"action for {name} must be one of {SIGNAL_ACTIONS}, got {action!r}")
            plan = _PLANS[action]
            if plan is not None:
                self._plans[int(signum)] = plan
        self._previous: dict[int, Handler] = {}
        # Written by the handler, read on the training thread. The handler runs
        # on the main thread between two bytecodes, possibly in the middle of
        # poll(): deque.append/popleft are atomic, so nothing is lost.
        self._received: collections.deque[tuple[int, float]] = collections.deque()
        self._stop_at: float | None = None  # monotonic time of the first stopping signal
        self._published_stop = False
        self._waiting: dict[str, tuple[str, float]] = {}  # request id -> (signal name, wall time received)
        # The bus receivers, connected once (start may run again when it installed no handler), cancelled by
        # close; None while not connected.
        self._subscriptions: ExitStack | None = None
        self._main = True  # the main process answers a stopping signal at once (set at start)
        self._launched = False  # started by torchrun / accelerate launch, whose own report follows ours

    @property
    def handled(self) -> tuple[signal.Signals, ...]:
        """The signals this source handles (those whose action is not ``none``)."""
        return tuple(signal.Signals(s) for s in self._plans)

    @property
    def installed(self) -> tuple[signal.Signals, ...]:
        """The signals whose handler is installed now."""
        return tuple(signal.Signals(s) for s in self._previous)

    @property
    def stop_requested(self) -> bool:
        """True once a stopping signal reached this process (even before the ranks voted on it).

        Needs no collective; it is local to this rank.
        """
        return self._stop_at is not None

    # -- TriggerSource -------------------------------------------------------

    def start(self, bus: Bus, run: RunInfo) -> None:
        if not self._plans or self._previous:
            return  # nothing to handle, or already started
        self.bus = bus
        self._main = run.is_main_process
        self._launched = "TORCHELASTIC_RUN_ID" in os.environ
        if threading.current_thread() is not threading.main_thread():
            logger.warning(
                "ckptbus: started outside the main thread; signal handlers for %s were not installed, so these "
                "signals will not save a checkpoint. Create DynamicCheckpoint on the main thread.",
                ", ".join(s.name for s in self.handled),
            )
            return
        for signum in self._plans:
            name = signal.Signals(signum).name
            previous = signal.getsignal(signum)
            if previous == signal.SIG_IGN:
                logger.info("ckptbus: %s is ignored by this process (nohup?); leaving it ignored", name)
                continue
            if previous is None:
                logger.warning(
                    "ckptbus: %s has a handler installed outside Python; ckptbus replaces it and puts back the "
                    "default action at the end. Set dynamic_checkpoint.signals.%s: none to keep it.",
                    name,
                    name.lower(),
                )
            signal.signal(signum, self._handle)
            self._previous[signum] = previous
        if self._subscriptions is None:
            self._subscriptions = ExitStack()
            for name in ("save_completed", "save_failed"):
                self._subscriptions.enter_context(self.bus.subscribe(name, self._on_save_done))

    def poll(self, step: int) -> None:
        received: list[tuple[int, float]] = []
        while self._received:
            received.append(self._received.popleft())
        first_seen: dict[int, float] = {}
        for signum, at in received:
            first_seen.setdefault(signum, at)
        for signum, at in first_seen.items():
            plan = self._plans[signum]
            if plan.exit_after and self._published_stop:
                continue  # one stopping request is enough; repeats within the debounce window are the same press
            self._published_stop = self._published_stop or plan.exit_after
            name = signal.Signals(signum).name
            request = SaveRequested(
                kind=plan.kind, reason=f"signal:{name}", exit_after=plan.exit_after, requested_at=at
            )
            self._waiting[request.request_id] = (name, at)
            # Every rank that got the signal says so (it names the pid): a signal may reach one rank only.
            logger.warning(
                "ckptbus: %s received (pid %d); every rank saves a %s checkpoint at step %d or %d%s",
                name,
                os.getpid(),
                plan.kind,
                step,
                step + 1,  # step + 1 where the vote of this step is read at the next one (Coordinator docs)
                " and stops" if plan.exit_after else " and training goes on",
            )
            self.bus.publish(request)

    def close(self) -> None:
        subscriptions, self._subscriptions = self._subscriptions, None
        if subscriptions is not None:
            subscriptions.close()
        if not self._previous:
            return
        if threading.current_thread() is not threading.main_thread():
            logger.warning("ckptbus: closed outside the main thread; signal handlers stay installed")
            return
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) != self._handle:
                logger.debug("ckptbus: %s was re-assigned by someone else; leaving it", signal.Signals(signum).name)
                continue
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    # -- the handler: records, nothing else -----------------------------------

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # No logging, no bus, no locks here: the interrupted code on this very
        # thread may hold the lock any of them would take.
        plan = self._plans.get(signum)
        if plan is None:
            return
        if plan.exit_after:
            now = time.monotonic()
            if self._stop_at is None:
                self._stop_at = now
                if self._main:
                    self._acknowledge(signum, plan)
            elif now - self._stop_at > self.debounce_seconds:
                self._abort(signum)
        self._received.append((signum, time.time()))
        previous = self._previous.get(signum)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)

    @staticmethod
    def _acknowledge(signum: int, plan: _Plan) -> None:
        """Say at once, even in the middle of a long step, what the first stopping signal does (handler-safe: one
        write to standard error, no logging, no locks)."""
        name = signal.Signals(signum).name
        again = "press Ctrl+C again" if signum == signal.SIGINT else f"send {name} again"
        message = (
            f"\nckptbus: {name}: every rank saves a {plan.kind} checkpoint at the end of this step, then stops; "
            f"{again} to abort without it\n"
        )
        os.write(2, message.encode())

    def _abort(self, signum: int) -> None:
        """Die at once by ``signum``'s default action (a second press); never returns."""
        name = signal.Signals(signum).name
        message = (
            f"\nckptbus: second stopping signal ({name}): aborting now; a checkpoint being written is not completed\n"
        )
        os.write(2, message.encode())
        signal.signal(signum, signal.SIG_DFL)
        if signum not in signal.pthread_sigmask(signal.SIG_BLOCK, []):
            os.kill(os.getpid(), signum)
        os._exit(128 + signum)  # only if the signal is blocked or its default action does not end the process

    # -- how long it took (for sizing grace periods) ---------------------------

    def _on_save_done(self, event: SaveCompleted | SaveFailed) -> None:
        for request_id in event.request_ids:
            waiting = self._waiting.pop(request_id, None)
            if waiting is None:
                continue
            name, at = waiting
            if isinstance(event, SaveCompleted):
                logger.info(
                    "ckptbus: %s: %s checkpoint %s complete %.2f s after the signal (writing took %.2f s); "
                    "give the job a grace period longer than that",
                    name,
                    event.kind,
                    event.path,
                    time.time() - at,
                    event.seconds,
                )
                if event.exit_after and self._launched and self._main:
                    signum = int(signal.Signals[name])
                    logger.info(
                        "ckptbus: the checkpoint is %s; every rank now exits with status %d, %s: expected after %s",
                        event.path,
                        128 + signum,
                        launcher_report(signum),
                        name,
                    )
            else:
                logger.warning(
                    "ckptbus: %s: the checkpoint at step %d failed %.2f s after the signal: %s",
                    name,
                    event.step,
                    time.time() - at,
                    event.error,
                )


def launcher_report(signum: int, environ: Mapping[str, str] = os.environ) -> str:
    """What the launcher prints and returns once every rank exited with ``128 + signum`` (docs/signals.md).

    ``accelerate launch`` 1.16 and later exits with ``128 + signum`` and no
    traceback when the signal reached the launcher too (a terminal's Ctrl+C,
    a scheduler's signal to the job); earlier versions, and ``torchrun``,
    print a traceback of their own and exit 1. A signal sent to the ranks
    alone is a failure of the ranks to every launcher: a traceback, status 1.
    """
    if not any(name.startswith("ACCELERATE_") for name in environ):  # accelerate launch sets them for its ranks
        return "which torchrun reports with a traceback of its own and status 1"
    version = _accelerate_version()
    if version is None or version[:2] < (1, 16):
        shown = ".".join(map(str, version)) if version else "(version unknown)"
        return f"which accelerate launch {shown} reports with a traceback of its own and status 1"
    return (
        f"which accelerate launch {'.'.join(map(str, version))} passes on as its own status {128 + signum} "
        "without a traceback (a traceback and status 1 if the signal reached the ranks alone)"
    )


def _accelerate_version() -> tuple[int, ...] | None:
    """The installed accelerate's version as numbers (the launcher runs from the same environment as its ranks)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("accelerate")
    except PackageNotFoundError:
        return None
    numbers = []
    for part in text.split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        numbers.append(int(digits))
    return tuple(numbers) or None
