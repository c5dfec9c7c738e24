"""The event bus: blinker signals owned by one run.

Each :class:`Bus` makes its own ``blinker.Signal`` objects instead of using
blinker's global ``signal()`` namespace, so two runs in one process (tests,
notebooks) never see each other's events.

Receivers are called with the event as their only positional argument::

    subscription = bus.subscribe("save_completed", lambda event: print(event.path))
    ...
    subscription.cancel()          # or: with bus.subscribe(...): ...

:meth:`Bus.subscribe` returns a :class:`Subscription`, the handle that
disconnects the receiver again (accelerate's ``RemovableHandle`` is the
model): code that connects for a while keeps the handles and cancels them,
instead of pairing each ``subscribe`` with an ``unsubscribe`` by hand.

Receivers run in the thread that publishes: ``save_requested`` may arrive on
a socket thread; ``save_started``, ``save_completed`` and ``save_failed`` are
always published on the training thread of every rank.

Receivers are called in the order they were connected. A receiver that
raises does not stop the others and does not stop training:
the exception is logged and a :class:`~ckptbus.ReceiverFailed` event is
published on ``receiver_failed`` (a receiver of that signal that raises is
only logged).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Set as AbstractSet
from types import TracebackType
from typing import Any, Final, Generic, ParamSpec, TypeVar, final

from blinker import NamedSignal

from ._events import Event, ReceiverFailed, SaveCompleted, SaveFailed, SaveRequested, SaveStarted

logger = logging.getLogger("ckptbus")

P = ParamSpec("P")
R = TypeVar("R")

SIGNAL_NAMES: Final = ("save_requested", "save_started", "save_completed", "save_failed", "receiver_failed")


class _InsertionOrderedSet(set[Any]):
    """A set that iterates in insertion order (blinker's ``set_class`` hook; its default ``set`` calls
    receivers in an order that changes from run to run). Only the operations blinker uses keep the order."""

    def __init__(self, items: Iterable[Any] = ()) -> None:
        super().__init__()
        self._order: dict[Any, None] = {}
        for item in items:
            self.add(item)

    def add(self, item: Any) -> None:
        super().add(item)
        self._order[item] = None

    def discard(self, item: Any) -> None:
        super().discard(item)
        self._order.pop(item, None)

    def remove(self, item: Any) -> None:
        super().remove(item)
        del self._order[item]

    def clear(self) -> None:
        super().clear()
        self._order.clear()

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._order))

    def copy(self) -> _InsertionOrderedSet:
        return _InsertionOrderedSet(self._order)

    def __or__(self, other: AbstractSet[Any]) -> _InsertionOrderedSet:
        merged = self.copy()
        for item in other:
            merged.add(item)
        return merged


class _Signal(NamedSignal):
    """A named blinker signal that calls its receivers in the order they were connected."""

    set_class = _InsertionOrderedSet


class Bus:
    """The signals of one run. See the module docstring for the threading rules."""

    __slots__ = ("_lock", "receiver_failed", "save_completed", "save_failed", "save_requested", "save_started")

    def __init__(self) -> None:
        self.save_requested = _Signal("save_requested")
        """A :class:`~ckptbus.SaveRequested`: somebody asked for a checkpoint."""
        self.save_started = _Signal("save_started")
        """A :class:`~ckptbus.SaveStarted`: all ranks agreed, writing begins."""
        self.save_completed = _Signal("save_completed")
        """A :class:`~ckptbus.SaveCompleted`: the checkpoint is complete on disk."""
        self.save_failed = _Signal("save_failed")
        """A :class:`~ckptbus.SaveFailed`: nothing was made visible."""
        self.receiver_failed = _Signal("receiver_failed")
        """A :class:`~ckptbus.ReceiverFailed`: a receiver raised (it was logged)."""
        # Receivers may be connected from user threads while the training
        # thread publishes; blinker's own structures are not documented as
        # thread-safe, so connect and publish take this lock.
        self._lock = threading.RLock()

    def subscribe(self, name: str, receiver: Callable[P, R]) -> Subscription[P, R]:
        """Connect ``receiver`` (strongly) to the signal called ``name``; returns its :class:`Subscription`.

        The handle disconnects it again (``cancel()``, or leaving a ``with``
        block), and it can be called like ``receiver`` itself, so code that
        kept the return value as the receiver (``fn = bus.subscribe(...)``, or
        ``@functools.partial(bus.subscribe, "save_completed")`` as a decorator)
        works as before. A receiver is connected to a signal at most once:
        subscribing it again gives another handle to the same connection.
        A :class:`Subscription` passed as ``receiver`` stands for its receiver.

        Raises ``ValueError`` for an unknown signal name.
        """
        signal = self._signal(name)
        target: Callable[P, R] = receiver.receiver if isinstance(receiver, Subscription) else receiver
        with self._lock:
            signal.connect(target, weak=False)
        return Subscription(self, name, target)

    def unsubscribe(self, name: str, receiver: Callable[..., Any]) -> None:
        """Disconnect ``receiver`` (or the receiver of a :class:`Subscription`) from ``name``; a receiver not
        connected is ignored. Raises ``ValueError`` for an unknown signal name."""
        signal = self._signal(name)
        target = receiver.receiver if isinstance(receiver, Subscription) else receiver
        with self._lock:
            signal.disconnect(target)

    def publish(self, event: Event) -> None:
        """Send ``event`` on the signal that matches its type.

        Every receiver is called even if an earlier one raised; exceptions are
        logged and reported on ``receiver_failed``, never propagated.
        """
        signal = self._signal_for(event)
        with self._lock:
            receivers = list(signal.receivers_for(event))
        for receiver in receivers:
            try:
                receiver(event)
            except Exception as exc:
                self._report_receiver_error(signal, receiver, exc)

    def _report_receiver_error(self, signal: NamedSignal, receiver: Callable[..., Any], exc: Exception) -> None:
        name = getattr(receiver, "__qualname__", repr(receiver))
        logger.warning(
            "ckptbus: receiver %s of %s raised %s: %s (training continues)",
            name,
            signal.name,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
        if signal is self.receiver_failed:
            return  # never recurse: a failing error handler is only logged
        self.publish(ReceiverFailed(signal=str(signal.name), receiver=name, error=f"{type(exc).__name__}: {exc}"))

    def _signal(self, name: str) -> NamedSignal:
        if name not in SIGNAL_NAMES:
            raise ValueError(f"unknown bus signal {name!r}; the signals are {', '.join(SIGNAL_NAMES)}")
        signal: NamedSignal = getattr(self, name)
        return signal

    def _signal_for(self, event: Event) -> NamedSignal:
        if isinstance(event, SaveRequested):
            return self.save_requested
        if isinstance(event, SaveStarted):
            return self.save_started
        if isinstance(event, SaveCompleted):
            return self.save_completed
        if isinstance(event, SaveFailed):
            return self.save_failed
        if isinstance(event, ReceiverFailed):
            return self.receiver_failed
        raise TypeError(f"not a ckptbus event: {event!r}")


@final
class Subscription(Generic[P, R]):
    """One receiver connected to one signal of a :class:`Bus`: what :meth:`Bus.subscribe` returns.

    ``cancel()`` disconnects it; it is idempotent, and only the first call
    disconnects, so a handle cancelled late never disconnects a later
    subscription of the same receiver. As a context manager the receiver is
    connected for the ``with`` block (``with bus.subscribe(name, fn): ...``).
    Calling the handle calls the receiver (what ``subscribe`` returned
    before it returned handles), with the same arguments and result.

    Cancelling takes the bus's lock for an instant: call it from any thread
    but not from a signal handler (nothing in ckptbus does).
    """

    __slots__ = ("_active", "_bus", "_receiver", "name")

    def __init__(self, bus: Bus, name: str, receiver: Callable[P, R]) -> None:
        self._bus = bus
        self.name = name
        """The signal the receiver is connected to."""
        self._receiver = receiver
        self._active = True

    @property
    def receiver(self) -> Callable[P, R]:
        """The receiver this handle connected."""
        return self._receiver

    @property
    def active(self) -> bool:
        """False once :meth:`cancel` ran (the receiver may still be connected through another handle)."""
        return self._active

    def cancel(self) -> None:
        """Disconnect the receiver from the signal; a second call does nothing."""
        with self._bus._lock:
            if not self._active:
                return
            self._active = False
            self._bus.unsubscribe(self.name, self._receiver)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._receiver(*args, **kwargs)

    def __enter__(self) -> Subscription[P, R]:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.cancel()

    def __repr__(self) -> str:
        name = getattr(self._receiver, "__qualname__", repr(self._receiver))
        state = "" if self._active else ", cancelled"
        return f"<Subscription {name} to {self.name}{state}>"


__all__ = ["SIGNAL_NAMES", "Bus", "Subscription"]
