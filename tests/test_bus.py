"""The bus: private blinker signals, subscription handles, frozen payloads, receivers that raise, the event log."""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import logging
import threading
from pathlib import Path
from typing import Any

import blinker
import pytest

from ckptbus import (
    SIGNAL_NAMES,
    Bus,
    EventLog,
    ReceiverFailed,
    SaveCompleted,
    SaveFailed,
    SaveRequested,
    SaveStarted,
    Subscription,
)

COMMON: dict[str, Any] = {
    "step": 7,
    "kind": "full",
    "reasons": ("file",),
    "request_ids": ("file-1-1",),
    "labels": (),
    "exit_after": False,
}


def one_of_each() -> list[Any]:
    return [
        SaveRequested(reason="file"),
        SaveStarted(path="/out/checkpoint-7", **COMMON),
        SaveCompleted(path="/out/checkpoint-7", bytes=10, seconds=0.5, **COMMON),
        SaveFailed(error="disk full", **COMMON),
        ReceiverFailed(signal="save_completed", receiver="r", error="ValueError: x"),
    ]


def test_the_five_signals() -> None:
    assert SIGNAL_NAMES == ("save_requested", "save_started", "save_completed", "save_failed", "receiver_failed")
    bus = Bus()
    for name in SIGNAL_NAMES:
        assert isinstance(getattr(bus, name), blinker.Signal)


def test_each_event_goes_to_its_own_signal_only() -> None:
    bus = Bus()
    seen: dict[str, list[Any]] = {name: [] for name in SIGNAL_NAMES}
    for name in SIGNAL_NAMES:
        bus.subscribe(name, seen[name].append)
    events = one_of_each()
    for event in events:
        bus.publish(event)
    assert seen == {name: [event] for name, event in zip(SIGNAL_NAMES, events, strict=True)}


def test_signals_are_private_to_each_bus_and_not_global() -> None:
    first, second = Bus(), Bus()
    got: list[Any] = []
    first.subscribe("save_requested", got.append)
    second.publish(SaveRequested())
    # blinker's global namespace holds nothing of ours.
    blinker.signal("save_requested").send(SaveRequested())
    assert got == []
    assert first.save_requested is not second.save_requested
    assert not blinker.signal("save_requested").receivers
    event = SaveRequested()
    first.publish(event)
    assert got == [event]


def test_subscribe_holds_a_strong_reference() -> None:
    """blinker connects weakly by default: a receiver defined in a function would silently vanish."""
    bus = Bus()
    got: list[Any] = []

    def subscribe_a_local_function() -> None:
        def receiver(event: Any) -> None:
            got.append(event)

        bus.subscribe("save_completed", receiver)

    subscribe_a_local_function()
    gc.collect()
    bus.publish(one_of_each()[2])
    assert len(got) == 1


def test_unsubscribe_disconnects_a_receiver_or_its_handle() -> None:
    bus = Bus()
    got: list[Any] = []

    def receiver(event: Any) -> None:
        got.append(event)

    bus.subscribe("save_started", receiver)
    bus.publish(one_of_each()[1])
    bus.unsubscribe("save_started", receiver)
    bus.unsubscribe("save_started", receiver)  # not connected any more: ignored
    bus.publish(one_of_each()[1])
    handle = bus.subscribe("save_started", receiver)
    bus.unsubscribe("save_started", handle)  # the handle stands for its receiver
    bus.publish(one_of_each()[1])
    assert len(got) == 1
    assert not bus.save_started.receivers


def test_subscribe_returns_a_handle_that_cancels_once() -> None:
    bus = Bus()
    got: list[Any] = []
    handle = bus.subscribe("save_started", got.append)
    assert isinstance(handle, Subscription)
    assert (handle.name, handle.receiver, handle.active) == ("save_started", got.append, True)
    bus.publish(one_of_each()[1])
    handle.cancel()
    handle.cancel()  # idempotent
    assert not handle.active
    assert "cancelled" in repr(handle)
    bus.publish(one_of_each()[1])
    assert len(got) == 1


def test_a_late_cancel_does_not_disconnect_a_later_subscription() -> None:
    bus = Bus()
    got: list[Any] = []
    first = bus.subscribe("save_started", got.append)
    first.cancel()
    second = bus.subscribe("save_started", got.append)
    first.cancel()  # cancelled already: must not touch the second connection
    bus.publish(one_of_each()[1])
    assert len(got) == 1 and second.active


def test_the_same_receiver_twice_is_one_connection() -> None:
    bus = Bus()
    got: list[Any] = []

    def receiver(event: Any) -> None:
        got.append(event)

    first = bus.subscribe("save_started", receiver)
    bus.subscribe("save_started", receiver)
    bus.publish(one_of_each()[1])
    assert len(got) == 1, "called once per event"
    first.cancel()
    bus.publish(one_of_each()[1])
    assert len(got) == 1, "cancelling either handle disconnects the receiver"


def test_a_handle_is_a_context_manager() -> None:
    bus = Bus()
    got: list[Any] = []
    with bus.subscribe("save_completed", got.append) as handle:
        bus.publish(one_of_each()[2])
        assert handle.active
    bus.publish(one_of_each()[2])
    assert len(got) == 1 and not handle.active
    with pytest.raises(RuntimeError, match="inside"), bus.subscribe("save_completed", got.append):
        raise RuntimeError("inside")  # an exception in the block disconnects too, and propagates
    assert not bus.save_completed.receivers


def test_a_handle_stands_in_for_its_receiver_where_the_receiver_was_returned() -> None:
    """subscribe returned the receiver itself before it returned handles; code that kept it still works."""
    bus = Bus()
    got: list[Any] = []

    @functools.partial(bus.subscribe, "save_completed")
    def record(event: SaveCompleted) -> str:
        got.append(event)
        return event.path

    event = one_of_each()[2]
    assert record(event) == "/out/checkpoint-7", "calling the handle calls the receiver"
    bus.publish(event)
    assert got == [event, event]
    assert list(bus.save_completed.receivers.values()) == [record.receiver], "the receiver itself is connected"
    again = bus.subscribe("save_completed", record)  # a handle given as a receiver stands for its receiver
    assert again.receiver is record.receiver
    bus.publish(event)
    assert len(got) == 3


def test_cancel_from_another_thread_while_publishing() -> None:
    bus = Bus()
    handles = [bus.subscribe("save_requested", lambda event, n=n: None) for n in range(200)]

    def cancel_all() -> None:
        for handle in handles:
            handle.cancel()

    cancelling = threading.Thread(target=cancel_all)
    cancelling.start()
    for _ in range(200):
        bus.publish(SaveRequested())
    cancelling.join(timeout=30)
    assert not bus.save_requested.receivers


def test_user_code_may_connect_with_blinker_directly() -> None:
    bus = Bus()
    got: list[Any] = []

    def receiver(event: Any) -> None:
        got.append(event)

    bus.save_failed.connect(receiver, weak=False)
    bus.publish(one_of_each()[3])
    assert [e.error for e in got] == ["disk full"]


def test_receivers_run_in_the_order_they_were_connected() -> None:
    bus = Bus()
    calls: list[int] = []
    receivers = []
    for n in range(30):

        def receiver(event: Any, n: int = n) -> None:
            calls.append(n)

        receivers.append(bus.subscribe("save_requested", receiver))
    bus.publish(SaveRequested())
    assert calls == list(range(30))
    calls.clear()
    bus.unsubscribe("save_requested", receivers[3])
    bus.subscribe("save_requested", receivers[3])  # connected again: now the last
    bus.publish(SaveRequested())
    assert calls == [n for n in range(30) if n != 3] + [3]


def test_unknown_signal_name_is_refused() -> None:
    bus = Bus()
    with pytest.raises(ValueError, match=r"unknown bus signal 'save_done'; the signals are save_requested, "):
        bus.subscribe("save_done", print)
    with pytest.raises(ValueError, match="unknown bus signal 'nope'"):
        bus.unsubscribe("nope", print)


def test_publishing_something_that_is_not_an_event_is_refused() -> None:
    with pytest.raises(TypeError, match="not a ckptbus event"):
        Bus().publish({"step": 1})  # type: ignore[arg-type]


def test_a_raising_receiver_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    bus = Bus()
    calls: list[str] = []
    failures: list[ReceiverFailed] = []

    def first(event: Any) -> None:
        calls.append("first")

    def broken(event: Any) -> None:
        calls.append("broken")
        raise RuntimeError("user receiver broke")

    def last(event: Any) -> None:
        calls.append("last")

    for receiver in (first, broken, last):
        bus.subscribe("save_completed", receiver)
    bus.subscribe("receiver_failed", failures.append)

    bus.publish(one_of_each()[2])  # does not raise

    assert calls == ["first", "broken", "last"]
    assert len(failures) == 1
    assert failures[0].signal == "save_completed"
    assert failures[0].receiver.endswith("broken")
    assert failures[0].error == "RuntimeError: user receiver broke"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "broken of save_completed raised RuntimeError: user receiver broke (training continues)" in (
        warnings[0].getMessage()
    )
    assert warnings[0].exc_info is not None  # the traceback is logged too


def test_a_raising_receiver_failed_receiver_is_only_logged(caplog: pytest.LogCaptureFixture) -> None:
    bus = Bus()
    calls: list[str] = []

    def broken(event: Any) -> None:
        raise ValueError("first")

    def broken_handler(event: Any) -> None:
        calls.append("handler")
        raise ValueError("handler")

    def other_handler(event: Any) -> None:
        calls.append("other")

    bus.subscribe("save_started", broken)
    bus.subscribe("receiver_failed", broken_handler)
    bus.subscribe("receiver_failed", other_handler)
    bus.publish(one_of_each()[1])
    # No recursion: the failing handler is logged once and not reported again.
    assert calls == ["handler", "other"]
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 2
    assert "of save_started raised ValueError: first" in messages[0]
    assert "of receiver_failed raised ValueError: handler" in messages[1]


def test_receivers_run_on_the_publishing_thread() -> None:
    bus = Bus()
    threads: list[str] = []
    bus.subscribe("save_requested", lambda event: threads.append(threading.current_thread().name))
    worker = threading.Thread(target=bus.publish, args=(SaveRequested(),), name="socket-thread")
    worker.start()
    worker.join(timeout=30)
    assert threads == ["socket-thread"]


@pytest.mark.parametrize("event", one_of_each(), ids=lambda e: type(e).__name__)
def test_payloads_are_frozen_and_slotted(event: Any) -> None:
    field = dataclasses.fields(event)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(event, field, "changed")
    with pytest.raises((AttributeError, TypeError)):
        event.extra = 1
    assert not hasattr(event, "__dict__")
    for f in dataclasses.fields(event):
        assert not isinstance(getattr(event, f.name), (list, dict, set)), f"{f.name} is mutable"


def test_save_requested_defaults_and_checks() -> None:
    first, second = SaveRequested(), SaveRequested(reason="socket")
    assert (first.kind, first.reason, first.exit_after, first.label) == ("full", "api", False, None)
    assert first.request_id.startswith("api-") and second.request_id.startswith("socket-")
    assert first.request_id != SaveRequested().request_id
    assert SaveRequested(request_id="mine").request_id == "mine"
    with pytest.raises(ValueError, match=r"kind must be one of \('full', 'weights'\), got 'optimizer'"):
        SaveRequested(kind="optimizer")  # type: ignore[arg-type]


def test_event_log_writes_one_json_line_per_event(tmp_path: Path) -> None:
    bus = Bus()
    log = EventLog(tmp_path / "events.jsonl").attach(bus)
    events = one_of_each()
    for event in events:
        bus.publish(event)
    log.detach()
    log.detach()  # twice is fine
    bus.publish(SaveRequested())  # after detach: not written
    assert not any(getattr(bus, name).receivers for name in SIGNAL_NAMES)
    rows = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [row["event"] for row in rows] == [type(e).__name__ for e in events]
    assert rows[2]["path"] == "/out/checkpoint-7"
    assert rows[2]["reasons"] == ["file"]
    assert all(isinstance(row["time"], float) for row in rows)
