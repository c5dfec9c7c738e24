"""The contract every trigger source keeps, and the facts of the run a source is given.

A trigger source publishes :class:`~ckptbus.SaveRequested` on the run's bus.
It is built by the user (or by ckptbus from the config) with its own
settings only; the runtime hands it the bus and the facts of the run when it
starts it, on every rank, so one source object works under every adapter
(a hand-written accelerate loop, ``transformers.Trainer``, axolotl).

A new source (``a checkpoint every N seconds``)::

    class Every:
        reason = "timer"            # recorded in events and the manifest as given
        urgent = False              # its requests may wait for the next vote
        def __init__(self, seconds): self.seconds = seconds
        def start(self, bus, run):  self.bus, self.next = bus, time.monotonic() + self.seconds
        def poll(self, step):
            if time.monotonic() >= self.next:
                self.next += self.seconds
                self.bus.publish(SaveRequested(reason=self.reason))
        def close(self): pass

Sources are registered when the runtime is built (:func:`register_source`):
an object that is not one is refused with a :class:`~ckptbus.SetupError`
before training starts, not when it is first polled, and what the runtime
needs to know of it (``reason``, ``urgent``) is read there, once, into a
:class:`RegisteredSource`. Nothing else in ckptbus looks at a source's
optional members.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast, final, runtime_checkable

from ._errors import SetupError

if TYPE_CHECKING:
    from ._bus import Bus

logger = logging.getLogger("ckptbus")

REASON_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,31}")
"""What a source's ``reason`` may look like: it names the source in events, the manifest and the CLI."""

StatusProvider = Callable[[], Mapping[str, object]]
"""A snapshot of the run for status displays; safe to call from any thread."""


def _no_status() -> Mapping[str, object]:
    return {}


@dataclass(frozen=True, slots=True, kw_only=True)
class RunInfo:
    """What a trigger source learns about the run when it is started."""

    rank: int
    """This process's rank (0 is the main process)."""
    world_size: int
    """How many ranks the run has."""
    output_dir: Path
    """Where checkpoints, the trigger file and the socket live."""
    local_rank: int = 0
    """This process's rank on its machine."""
    status: StatusProvider = field(default=_no_status)
    """The run's status snapshot (what ``ckptbus status`` shows); safe to call from any thread."""

    @property
    def is_main_process(self) -> bool:
        """Whether this is rank 0: sources that act once per run (the file poller, the socket) act here only."""
        return self.rank == 0


@runtime_checkable
class TriggerSource(Protocol):
    """Something that publishes ``save_requested`` on a bus.

    ``start`` runs once on the training thread of every rank before the
    first step, with the run's bus and facts; ``poll`` runs on the training
    thread at every optimizer-step boundary, before the ranks vote (a source
    that only reacts to threads or signals may do nothing there); ``close``
    undoes ``start`` and must be safe to call twice. None of them may call a
    collective or save anything.

    Optional members, read when present (a source without one gets the
    default). They are not declared on this protocol: users' sources need
    not inherit from it, and ``isinstance(obj, TriggerSource)`` looks at the
    three methods only.

    ``reason`` (``str | None``, default None)
        The reason its requests carry, a short lower-case name
        (:data:`REASON_PATTERN`). Declared, it is recorded in events and the
        manifest as given; a request whose reason no source declared (and
        that is not one of ckptbus's own) is recorded as ``other``.
    ``urgent`` (``bool``, default False)
        True for a source that must be honoured within one step (the
        signals): while it runs, the ranks vote at every step instead of
        every ``check_interval`` steps.
    ``stop_requested`` (``bool``, usually a property; default False)
        True once a request to stop reached this rank and waits for the next
        vote (a stopping signal). Read on the training thread at any time
        (``DynamicCheckpoint.stop_requested``), so it must be cheap and
        local: no collective, no I/O.

    ``reason`` and ``urgent`` are read once, when the source is registered
    (:func:`register_source`); ``stop_requested`` every time it is asked.
    """

    def start(self, bus: Bus, run: RunInfo) -> None: ...

    def poll(self, step: int) -> None: ...

    def close(self) -> None: ...


@final
@dataclass(frozen=True, slots=True)
class RegisteredSource:
    """A trigger source accepted by :func:`register_source`, with the traits read from it then.

    It is a :class:`TriggerSource` itself: ``start``, ``poll`` and ``close``
    forward to :attr:`source` (and raise what it raises).
    """

    source: TriggerSource
    """The source as the user (or the config) gave it."""
    reason: str | None
    """Its declared ``reason``, or None."""
    urgent: bool
    """Whether the ranks must vote at every step while it runs."""

    def stop_requested(self) -> bool:
        """The source's ``stop_requested`` now (False for a source without one); local, no collective."""
        return bool(getattr(self.source, "stop_requested", False))

    def start(self, bus: Bus, run: RunInfo) -> None:
        """The source's ``start``."""
        self.source.start(bus, run)

    def poll(self, step: int) -> None:
        """The source's ``poll``."""
        self.source.poll(step)

    def close(self) -> None:
        """The source's ``close``."""
        self.source.close()


def register_source(source: object) -> RegisteredSource:
    """Check that ``source`` keeps the :class:`TriggerSource` contract and read its traits, once.

    Raises :class:`~ckptbus.SetupError` naming the source and what is wrong:
    a missing method, a ``start`` that does not take ``(bus, run)``, a
    ``reason`` that is not a short lower-case name, an ``urgent`` or a
    ``stop_requested`` that is not a bool. A :class:`RegisteredSource` is
    returned as it is.
    """
    if isinstance(source, RegisteredSource):
        return source
    what = f"trigger source {source!r}"
    missing = [name for name in ("start", "poll", "close") if not callable(getattr(source, name, None))]
    if missing:
        raise SetupError(
            f"{what} is not a trigger source: it has no {', '.join(missing)} method. A source needs "
            "start(bus, run), poll(step) and close() (see ckptbus.TriggerSource)."
        )
    try:
        inspect.signature(source.start).bind(None, None)  # type: ignore[attr-defined]
    except TypeError:
        raise SetupError(
            f"{what}: start() must take the run's bus and facts, start(bus, run) (see ckptbus.TriggerSource)"
        ) from None
    except ValueError:
        pass  # a builtin without a signature: taken as it is
    reason = getattr(source, "reason", None)
    if reason is not None and not (isinstance(reason, str) and REASON_PATTERN.fullmatch(reason)):
        raise SetupError(
            f"{what}: reason {reason!r} must be a short lower-case name matching {REASON_PATTERN.pattern} "
            "(it names the source in events and the manifest)"
        )
    urgent = _bool_member(source, what, "urgent", "True (the ranks vote at every step while it runs) or False")
    _bool_member(source, what, "stop_requested", "True (a stop waits for the next vote on this rank) or False")
    return RegisteredSource(cast(TriggerSource, source), reason, urgent)


def _bool_member(source: object, what: str, name: str, allowed: str) -> bool:
    """The bool ``source.<name>`` (False when it has none); raises SetupError for any other value."""
    value = getattr(source, name, False)
    if not isinstance(value, bool):
        # A method instead of a property is the likely slip: it would always read as true.
        hint = " (a method: make it a property)" if callable(value) else ""
        raise SetupError(
            f"{what}: {name} must be a bool, got {value!r}{hint}; allowed: {allowed} (see ckptbus.TriggerSource)"
        )
    return value


def check_source(source: object) -> TriggerSource:
    """``source`` itself if it keeps the :class:`TriggerSource` contract (see :func:`register_source`, which
    it calls); raises :class:`~ckptbus.SetupError` naming what is wrong otherwise."""
    return register_source(source).source


def close_all(sources: Iterable[TriggerSource]) -> None:
    """Close ``sources`` in reverse order; one that raises is logged and does not keep the others open."""
    for source in reversed(list(sources)):
        try:
            source.close()
        except Exception:
            logger.exception("ckptbus: closing %r failed", source)
