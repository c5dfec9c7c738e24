"""The coordinator: votes, merging, due steps, and requests kept until every rank agreed."""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from runs import results_of, run_ranks

from ckptbus import SaveRequested
from ckptbus._coordinator import (
    KNOWN_REASONS,
    VOTE_LENGTH,
    Coordinator,
    Decision,
    decode_vote,
    encode_vote,
    reason_slot,
    signal_number,
)

SCRIPTS = Path(__file__).parent / "scripts"


class OneProcessExchange:
    """The exchange of a run with one process: the vote is the result (what TorchExchange does there).

    It counts its calls so tests can tell a step where ranks voted from one where they did not.
    """

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def __call__(self, vote: Sequence[int]) -> list[int]:
        self.calls.append(list(vote))
        return list(vote)


def merged(*votes: Sequence[int]) -> list[int]:
    """What the all-reduce (MAX) of the ranks' votes computes."""
    return [max(slot) for slot in zip(*votes, strict=True)]


# -- votes ------------------------------------------------------------------------


def test_an_empty_vote_decides_nothing() -> None:
    vote = encode_vote([], scheduled=False)
    assert vote == [0] * VOTE_LENGTH
    assert decode_vote(4, vote, []) is None


def test_a_scheduled_step_votes_full_for_the_schedule() -> None:
    decision = decode_vote(20, encode_vote([], scheduled=True), [])
    assert decision == Decision(20, "full", False, ("schedule",), (), 0)
    assert decision.reason == "schedule"


def test_encode_and_decode_one_request_of_each_kind() -> None:
    weights = SaveRequested(kind="weights", reason="socket", label="before eval")
    decision = decode_vote(7, encode_vote([weights], scheduled=False), [weights])
    assert decision == Decision(7, "weights", False, ("socket",), (weights,), 0)
    full = SaveRequested(reason="file")
    assert decode_vote(7, encode_vote([full], scheduled=False), [full]) == Decision(
        7, "full", False, ("file",), (full,)
    )


def test_exit_flag_and_signal_number_travel() -> None:
    request = SaveRequested(reason="signal:SIGTERM", exit_after=True)
    vote = encode_vote([request], scheduled=False)
    decision = decode_vote(3, vote, [request])
    assert decision is not None
    assert decision.exit_after is True
    assert decision.signum == int(signal.SIGTERM)
    assert decision.reasons == ("signal",)


def test_unknown_reasons_travel_as_other() -> None:
    request = SaveRequested(reason="my-callback")
    decision = decode_vote(1, encode_vote([request], scheduled=False), [request])
    assert decision is not None and decision.reasons == ("other",)


def test_reason_slots_and_signal_numbers() -> None:
    slots = [reason_slot(r) for r in KNOWN_REASONS]
    assert len(set(slots)) == len(KNOWN_REASONS)
    assert max(slots) == VOTE_LENGTH - 1
    assert reason_slot("signal:SIGINT") == reason_slot("signal")
    assert reason_slot("anything") == reason_slot("other")
    assert signal_number("signal:SIGINT") == int(signal.SIGINT)
    assert signal_number("signal:SIGNOPE") == 0
    assert signal_number("socket") == 0
    assert signal_number("file:SIGINT") == 0


def test_decode_refuses_a_vote_of_the_wrong_length() -> None:
    with pytest.raises(ValueError, match=f"vote has 3 slots, expected {VOTE_LENGTH}"):
        decode_vote(1, [1, 0, 0], [])


# -- merging the votes of several ranks ---------------------------------------------------


def test_full_wins_over_weights_and_reasons_merge_in_a_fixed_order() -> None:
    rank0 = [SaveRequested(kind="weights", reason="socket")]
    rank1 = [SaveRequested(kind="full", reason="file")]
    vote = merged(encode_vote(rank0, False), encode_vote(rank1, False))
    for mine in (rank0, rank1):
        decision = decode_vote(9, vote, mine)
        assert decision is not None
        assert decision.kind == "full"
        assert decision.reasons == ("file", "socket")
        assert decision.requests == tuple(mine), "each rank answers its own requests"


def test_weights_on_every_rank_stays_weights() -> None:
    requests = [SaveRequested(kind="weights", reason="api")]
    decision = decode_vote(2, merged(encode_vote(requests, False), encode_vote([], False)), [])
    assert decision is not None and decision.kind == "weights"


def test_schedule_and_file_on_the_same_step_is_one_full_save() -> None:
    # The file trigger is polled on the main process only; the schedule is known to all.
    rank0 = [SaveRequested(reason="file")]
    decision = decode_vote(10, merged(encode_vote(rank0, True), encode_vote([], True)), rank0)
    assert decision is not None
    assert (decision.kind, decision.reason) == ("full", "schedule+file")


def test_exit_from_one_rank_and_the_highest_signal_win() -> None:
    rank0 = [SaveRequested(reason="signal:SIGINT", exit_after=True)]
    rank1 = [SaveRequested(reason="signal:SIGTERM"), SaveRequested(reason="api", kind="weights")]
    decision = decode_vote(5, merged(encode_vote(rank0, False), encode_vote(rank1, False)), [])
    assert decision is not None
    assert decision.exit_after is True
    assert decision.signum == max(int(signal.SIGINT), int(signal.SIGTERM))
    assert decision.reasons == ("signal", "api")
    assert decision.kind == "full"


request_strategy = st.builds(
    SaveRequested,
    kind=st.sampled_from(["full", "weights"]),
    reason=st.sampled_from(["file", "socket", "api", "signal:SIGINT", "signal:SIGTERM", "signal:SIGUSR1", "zzz"]),
    exit_after=st.booleans(),
)


@given(ranks=st.lists(st.lists(request_strategy, max_size=4), min_size=1, max_size=4), scheduled=st.booleans())
def test_merging_is_the_union_of_what_every_rank_asked(ranks: list[list[SaveRequested]], scheduled: bool) -> None:
    votes = [encode_vote(requests, scheduled) for requests in ranks]
    everything = [r for requests in ranks for r in requests]
    # The all-reduce may combine the ranks in any order: the outcome must not depend on it.
    assert merged(*votes) == merged(*reversed(votes))
    decision = decode_vote(1, merged(*votes), ranks[0])
    if not everything and not scheduled:
        assert decision is None
        return
    assert decision is not None
    wants_full = scheduled or any(r.kind == "full" for r in everything)
    assert decision.kind == ("full" if wants_full else "weights")
    assert decision.exit_after == any(r.exit_after for r in everything)
    assert decision.signum == max([signal_number(r.reason) for r in everything] + [0])
    expected = {r.reason.split(":")[0] for r in everything} | ({"schedule"} if scheduled else set())
    expected = {r if r in KNOWN_REASONS else "other" for r in expected}
    assert set(decision.reasons) == expected
    assert list(decision.reasons) == [r for r in KNOWN_REASONS if r in expected]
    assert decision.requests == tuple(ranks[0])


# -- due steps ---------------------------------------------------------------------------


def test_is_due_and_is_scheduled() -> None:
    coordinator = Coordinator(OneProcessExchange(), check_interval=5, save_steps=7)
    assert [s for s in range(1, 30) if coordinator.is_due(s)] == [5, 7, 10, 14, 15, 20, 21, 25, 28]
    assert [s for s in range(0, 30) if coordinator.is_scheduled(s)] == [7, 14, 21, 28]
    unscheduled = Coordinator(OneProcessExchange(), check_interval=3)
    assert not any(unscheduled.is_scheduled(s) for s in range(50))
    assert [s for s in range(1, 10) if unscheduled.is_due(s)] == [3, 6, 9]
    every = Coordinator(OneProcessExchange(), check_interval=100, every_step=True)
    assert all(every.is_due(s) for s in range(1, 10))


def test_check_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="check_interval must be >= 1, got 0"):
        Coordinator(OneProcessExchange(), check_interval=0)


def test_no_exchange_on_steps_that_are_not_due() -> None:
    exchange = OneProcessExchange()
    coordinator = Coordinator(exchange, check_interval=5)
    for step in range(1, 5):
        assert coordinator.decide(step) is None
    assert exchange.calls == []
    assert coordinator.decide(5) is None
    assert len(exchange.calls) == 1, "a due step exchanges even when nobody asked (other ranks may have)"


# -- requests: pending until decided ------------------------------------------------------


def test_requests_wait_across_steps_that_are_not_due_and_are_consumed_when_decided() -> None:
    exchange = OneProcessExchange()
    coordinator = Coordinator(exchange, check_interval=5)
    first, second = SaveRequested(reason="file"), SaveRequested(reason="socket", kind="weights")
    coordinator.enqueue(first)
    assert coordinator.decide(1) is None
    coordinator.enqueue(second)
    for step in (2, 3, 4):
        assert coordinator.decide(step) is None
        assert coordinator.pending() == [first, second]
    decision = coordinator.decide(5)
    assert decision == Decision(5, "full", False, ("file", "socket"), (first, second), 0)
    assert coordinator.pending() == []
    assert coordinator.pending_count() == 0
    assert coordinator.decide(10) is None


def test_a_failing_exchange_keeps_the_requests() -> None:
    """A raising function stands in for a collective that failed; the real gloo failure is in the slow test below."""
    attempts: list[list[int]] = []

    def failing_once(vote: Sequence[int]) -> list[int]:
        attempts.append(list(vote))
        if len(attempts) == 1:
            raise RuntimeError("Connection closed by peer")
        return list(vote)

    coordinator = Coordinator(failing_once, check_interval=2)
    request = SaveRequested(reason="api", label="keep me")
    coordinator.enqueue(request)
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        coordinator.decide(2)
    assert coordinator.pending() == [request]
    later = SaveRequested(reason="file")
    coordinator.enqueue(later)
    decision = coordinator.decide(4)
    assert decision is not None and decision.requests == (request, later)
    assert attempts[0][reason_slot("api")] == 1 and attempts[0][reason_slot("file")] == 0
    assert attempts[1][reason_slot("api")] == 1 and attempts[1][reason_slot("file")] == 1
    assert coordinator.pending() == []


def test_force_decides_at_any_step_and_can_leave_the_schedule_out() -> None:
    coordinator = Coordinator(OneProcessExchange(), check_interval=5, save_steps=3)
    # At close the last step's scheduled save already happened: only pending requests count.
    assert coordinator.decide(6, force=True, scheduled=False) is None
    decision = coordinator.decide(6, force=True)
    assert decision is not None and decision.reasons == ("schedule",)
    request = SaveRequested(reason="api")
    coordinator.enqueue(request)
    decision = coordinator.decide(7, force=True, scheduled=False)
    assert decision == Decision(7, "full", False, ("api",), (request,), 0)


def test_drain_removes_everything_pending() -> None:
    coordinator = Coordinator(OneProcessExchange(), check_interval=5)
    requests = [SaveRequested(reason="api") for _ in range(3)]
    coordinator.enqueue(requests[0])
    assert coordinator.pending() == requests[:1]
    for request in requests[1:]:
        coordinator.enqueue(request)
    assert coordinator.pending_count() == 3
    assert coordinator.drain() == requests
    assert coordinator.pending_count() == 0
    assert coordinator.decide(5) is None


def test_enqueue_from_many_threads_loses_nothing() -> None:
    coordinator = Coordinator(OneProcessExchange(), check_interval=1)
    per_thread = 200

    def ask() -> None:
        for _ in range(per_thread):
            coordinator.enqueue(SaveRequested(reason="socket"))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    served = 0
    step = 0
    while any(t.is_alive() for t in threads) or coordinator.pending_count():
        step += 1
        decision = coordinator.decide(step)
        served += len(decision.requests) if decision else 0
    for t in threads:
        t.join(timeout=30)
    assert served == 4 * per_thread


# -- pipelined votes --------------------------------------------------------------------------


class StartedLater:
    """A started exchange of one process: its result is read by ``wait`` (a raising one stands in for a failure)."""

    def __init__(self, vote: Sequence[int], error: Exception | None = None) -> None:
        self.vote = list(vote)
        self.error = error

    def wait(self) -> list[int]:
        if self.error is not None:
            raise self.error
        return self.vote


class OneProcessStart:
    """``start_exchange`` of one process; records every started vote. ``fail_next`` makes the next wait raise."""

    def __init__(self) -> None:
        self.started: list[list[int]] = []
        self.fail_next = False

    def __call__(self, vote: Sequence[int]) -> StartedLater:
        self.started.append(list(vote))
        error = RuntimeError("Connection closed by peer") if self.fail_next else None
        self.fail_next = False
        return StartedLater(vote, error)


def pipelined(
    check_interval: int = 5, save_steps: int | None = None
) -> tuple[Coordinator, OneProcessExchange, OneProcessStart]:
    exchange, start = OneProcessExchange(), OneProcessStart()
    coordinator = Coordinator(
        exchange, check_interval=check_interval, save_steps=save_steps, every_step=True, start_exchange=start
    )
    return coordinator, exchange, start


def test_a_pipelined_vote_is_read_one_step_later() -> None:
    coordinator, exchange, start = pipelined()
    assert coordinator.pipelined
    request = SaveRequested(kind="weights", reason="signal:SIGINT", exit_after=True)
    coordinator.enqueue(request)
    assert coordinator.decide(1) is None
    assert coordinator.vote_in_flight and exchange.calls == [], "an ordinary step never blocks on a vote"
    assert coordinator.pending() == [request] and coordinator.pending_count() == 1, "in flight is still pending"
    decision = coordinator.decide(2)
    assert decision == Decision(2, "weights", True, ("signal",), (request,), int(signal.SIGINT))
    assert not coordinator.vote_in_flight, "no vote is started after a decision (the save or the stop comes first)"
    assert coordinator.pending() == []
    assert len(start.started) == 1 and exchange.calls == []


def test_requests_arriving_while_a_vote_is_in_flight_go_into_the_next_one() -> None:
    coordinator, _, start = pipelined()
    assert coordinator.decide(1) is None  # an empty vote in flight
    late = SaveRequested(reason="socket")
    coordinator.enqueue(late)
    assert coordinator.decide(2) is None, "the vote read at step 2 was started before the request came"
    assert start.started[1][reason_slot("socket")] == 1
    decision = coordinator.decide(3)
    assert decision is not None and decision.step == 3 and decision.requests == (late,)


def test_check_interval_multiples_and_scheduled_steps_block_and_merge_the_vote_in_flight() -> None:
    coordinator, exchange, _ = pipelined(check_interval=5, save_steps=7)
    assert [s for s in range(1, 16) if coordinator.blocks_at(s)] == [5, 7, 10, 14, 15]
    signal_request, file_request = SaveRequested(reason="signal:SIGTERM", exit_after=True), SaveRequested(reason="file")
    coordinator.enqueue(signal_request)
    assert coordinator.decide(4) is None
    coordinator.enqueue(file_request)  # the file trigger polls at step 5
    decision = coordinator.decide(5)
    # One save at step 5 for both: the vote started at 4 and the blocking one of step 5.
    assert decision == Decision(
        5, "full", True, ("file", "signal"), (signal_request, file_request), int(signal.SIGTERM)
    )
    assert len(exchange.calls) == 1
    assert coordinator.decide(6) is None
    assert coordinator.decide(7) == Decision(7, "full", False, ("schedule",), (), 0), "the schedule is never late"


def test_force_reads_the_vote_in_flight_and_leaves_none_running() -> None:
    coordinator, _, _ = pipelined()
    request = SaveRequested(reason="api")
    coordinator.enqueue(request)
    assert coordinator.decide(3) is None
    decision = coordinator.decide(3, force=True, scheduled=False)
    assert decision is not None and decision.requests == (request,)
    assert not coordinator.vote_in_flight
    assert coordinator.decide(3, force=True, scheduled=False) is None
    assert not coordinator.vote_in_flight


def test_a_vote_in_flight_that_fails_keeps_its_requests() -> None:
    coordinator, _, start = pipelined()
    request = SaveRequested(reason="api", label="keep me")
    coordinator.enqueue(request)
    start.fail_next = True
    assert coordinator.decide(1) is None
    later = SaveRequested(reason="file")
    coordinator.enqueue(later)
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        coordinator.decide(2)
    assert coordinator.pending() == [request, later] and not coordinator.vote_in_flight
    assert coordinator.decide(3) is None
    decision = coordinator.decide(4)
    assert decision is not None and decision.requests == (request, later)


def test_drain_answers_the_requests_of_a_vote_in_flight() -> None:
    coordinator, _, _ = pipelined()
    requests = [SaveRequested(reason="socket"), SaveRequested(reason="api")]
    coordinator.enqueue(requests[0])
    assert coordinator.decide(1) is None
    coordinator.enqueue(requests[1])
    assert coordinator.drain() == requests
    assert not coordinator.vote_in_flight and coordinator.pending_count() == 0


def test_without_every_step_start_exchange_changes_nothing() -> None:
    exchange, start = OneProcessExchange(), OneProcessStart()
    coordinator = Coordinator(exchange, check_interval=5, start_exchange=start)
    assert not coordinator.pipelined
    coordinator.enqueue(SaveRequested(reason="file"))
    assert [coordinator.decide(s) for s in range(1, 5)] == [None] * 4
    assert coordinator.decide(5) is not None
    assert start.started == [] and len(exchange.calls) == 1


# -- two real ranks over gloo --------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_agree_over_gloo_and_a_failed_exchange_keeps_the_request(tmp_path: Path) -> None:
    results = results_of(run_ranks(tmp_path, SCRIPTS / "coordinator_rank.py", timeout=180))
    for rank, result in enumerate(results):
        assert result["rank"] == rank and result["world_size"] == 2
        assert result["step3"] is None
        assert result["pending_after_step3"] == 1, "not due: the request waits"
        step5 = result["step5"]
        # rank 0 asked for weights over the socket, rank 1 for a full save on SIGTERM with exit.
        assert (step5["kind"], step5["exit_after"], step5["signum"]) == ("full", True, int(signal.SIGTERM))
        assert step5["reason"] in ("signal+socket", "signal:SIGTERM+socket")
        assert step5["requests"] == [["r0-weights"], ["r1-term"]][rank]
        assert result["pending_after_step5"] == 0
        assert result["step10"] is None
        # A request that reached rank 0 only is one save on both ranks.
        assert result["step15"] == {
            "step": 15,
            "kind": "full",
            "exit_after": False,
            "reason": "file",
            "signum": 0,
            "requests": [["r0-file"], []][rank],
        }
        assert result["step20"]["reason"] == "schedule"
        # Pipelined: a signal on rank 1 only, voted at step 21 without blocking, is one save at step 22 on both.
        assert result["piped21"] is None and result["piped21_in_flight"]
        assert result["piped22"] == {
            "step": 22,
            "kind": "weights",
            "exit_after": True,
            "reason": "signal:SIGINT",
            "signum": int(signal.SIGINT),
            "requests": [[], ["r1-int"]][rank],
        }
        assert not result["piped22_in_flight"], "no vote is left running past a decision"
        assert result["piped23"] is None
        assert result["piped24"] is None
        assert result["piped25"]["reason"] == "socket"
        assert result["piped25"]["requests"] == [["r0-socket"], []][rank]
        assert result["piped_close"] is None and not result["piped_close_in_flight"]
    assert "step25" not in results[0], "the peer left: the exchange must fail, not decide"
    assert results[0]["step25_error"].startswith("RuntimeError: ")
    assert results[0]["pending_after_failure"] == ["r0-api"]
