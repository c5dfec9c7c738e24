"""The step protocol (plugins/runtime.py) in process: 1, 2 and 3 ranks on threads, a recording sink, in seconds.

Real :class:`Runtime`, real Coordinator, Bus, config, commit strategy and event
log; the ranks exchange through tests/thread_ranks.py instead of gloo, and
the sink is :class:`RecordingSink` (a stand-in for the real sinks, which
tests/test_sinks_in_process.py runs for real and the end-to-end tests run
under ``accelerate launch``): it keeps the contract of ckptbus/_sink.py,
writes a one-file-per-rank checkpoint through the real ``RenameCommit`` and
agrees on every stage through the real ``Ranks.agree``, so a failure it is
told to raise on one rank is agreed the way the real sinks agree it. Its
asynchronous writer "ends" when the test says so (per rank), which makes the
steps where a save is committed exact instead of timing-dependent.

The config turns every signal off and the socket and the launcher watch off:
a signal handler cannot be installed from a thread (SignalTrigger only warns
there) and the tests must not depend on that. The file trigger runs (on rank
0) and never fires. Votes go through the collective (``CKPTBUS_VOTES``), except
in the one test that checks the shared-memory votes between thread ranks.
"""

from __future__ import annotations

import errno
import json
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from ckptbus.plugins.distributed import Ranks, StageFailed
from ckptbus.plugins.runtime import Runtime
from ckptbus.plugins.shared_votes import VOTES_ENV
from thread_ranks import (
    CollectiveMismatch,
    CollectiveTimeout,
    GroupBroken,
    ThreadCollective,
    ThreadGroup,
    run_ranks,
)

from ckptbus import (
    Bus,
    CheckpointConfig,
    DynamicCheckpointConfig,
    RankFailure,
    RunInfo,
    SaveCompleted,
    SaveFailed,
    SaveRequested,
    SaveStarted,
    SetupError,
    list_checkpoints,
    read_checkpoint,
)
from ckptbus._commit import RenameCommit
from ckptbus._config import OnSaveFailure, SignalsConfig, SocketConfig
from ckptbus._coordinator import Decision
from ckptbus._lock import acquire
from ckptbus._names import EVENT_LOG_NAME, STAGING_PREFIX
from ckptbus._sink import NotWritten, Outcome, SaveMode, SaveRecord, Written

SaveEvent = SaveStarted | SaveCompleted | SaveFailed


@pytest.fixture(autouse=True)
def _votes_through_the_collective(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VOTES_ENV, "collective")


# -- the recording sink ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    """One call the runtime made on the sink: the method, the step it was about, and poll's ``wait``."""

    method: str
    step: int
    wait: bool | None = None


class RecordingSink:
    """A sink (ckptbus/_sink.py) that records the runtime's calls and writes a tiny checkpoint. No bus: it
    publishes nothing, as the contract says (only the runtime publishes save outcomes).

    ``mode``: what :meth:`plan` answers for every decision. ``fail``: ``(method, rank)``: the save's stage in
    ``execute``, ``begin`` or ``poll`` raises ``OSError(ENOSPC)`` on that rank, once (later saves work).
    The asynchronous writer of a save begun here ends when the test calls :meth:`end_writer` on this rank or
    the runtime polls with ``wait`` (waiting for it is ending it).
    """

    def __init__(self, mode: SaveMode = "sync", *, fail: tuple[str, int] | None = None) -> None:
        self.mode: SaveMode = mode
        self.fail = fail
        self.calls: list[Call] = []
        self.ranks = Ranks()
        self.output_dir = Path()
        self.writer_ended = False
        self._flight: tuple[SaveRecord, RenameCommit] | None = None

    def end_writer(self) -> None:
        self.writer_ended = True

    @property
    def in_flight(self) -> bool:
        """Whether a save was begun and not settled (a deferred one: the framework has yet to write it)."""
        return self._flight is not None

    def start(self, ranks: Ranks, output_dir: Path) -> None:
        self.calls.append(Call("start", 0))
        self.ranks, self.output_dir = ranks, output_dir

    def plan(self, decision: Decision) -> tuple[Decision, SaveMode]:
        self.calls.append(Call("plan", decision.step))
        return decision, self.mode

    def execute(self, record: SaveRecord) -> Outcome:
        self.calls.append(Call("execute", record.step))
        commit = RenameCommit(self.output_dir, record.step)
        try:
            self.ranks.agree("creating the staging directory", commit.create if self.ranks.committer else _nothing)
            self.ranks.agree("writing", lambda: self._write(commit, "execute"))
        except StageFailed as failure:
            return self._discard(commit, failure)
        return self._commit(record, commit)

    def begin(self, record: SaveRecord) -> NotWritten | None:
        self.calls.append(Call("begin", record.step))
        commit = RenameCommit(self.output_dir, record.step)
        try:
            self.ranks.agree("creating the staging directory", commit.create if self.ranks.committer else _nothing)
            self.ranks.agree("copying the state to host memory", lambda: self._maybe_fail("begin"))
        except StageFailed as failure:
            return self._discard(commit, failure)
        self._flight = (record, commit)
        self.writer_ended = False
        return None

    def poll(self, *, wait: bool) -> Outcome | None:
        flight = self._flight
        self.calls.append(Call("poll", flight[0].step if flight else -1, wait))
        if flight is None:
            return None
        if wait:
            self.writer_ended = True
        if self.ranks.max([int(not self.writer_ended)])[0]:
            return None  # some rank's writer still runs
        self._flight = None
        record, commit = flight
        try:
            self.ranks.agree("writing", lambda: self._write(commit, "poll"))
        except StageFailed as failure:
            return self._discard(commit, failure)
        return self._commit(record, commit)

    def abandon(self) -> None:
        self.calls.append(Call("abandon", self._flight[0].step if self._flight else -1))
        self._flight = None  # no collective; the staging directory stays until the next start (as the real sinks)

    def rank_state(self) -> bytes:
        return f"rank {self.ranks.rank} state".encode()

    def rescue_unsupported(self) -> str | None:
        return None

    def rescue(self, record: SaveRecord, rank_states: Mapping[int, bytes]) -> Outcome:
        self.calls.append(Call("rescue", record.step))
        commit = RenameCommit(self.output_dir, record.step)
        commit.create()
        for rank, state in rank_states.items():
            (commit.directory / f"rank-{rank}.txt").write_bytes(state)
        commit.finalize(record, dict, {}, read_back=True)
        return Written(commit.final)

    # -- helpers ---------------------------------------------------------------------------------------------------

    def _maybe_fail(self, method: str) -> None:
        if self.fail == (method, self.ranks.rank):
            self.fail = None
            raise OSError(errno.ENOSPC, f"No space left on device (rank {self.ranks.rank}, in {method})")

    def _write(self, commit: RenameCommit, method: str) -> None:
        self._maybe_fail(method)
        (commit.directory / f"rank-{self.ranks.rank}.txt").write_text(f"rank {self.ranks.rank}\n")

    def _commit(self, record: SaveRecord, commit: RenameCommit) -> Outcome:
        def finalize() -> Written:
            if not self.ranks.committer:
                return Written(commit.final)
            manifest = commit.finalize(record, dict, {}, read_back=True)
            return Written(commit.final, manifest.bytes)

        try:
            written: Written = self.ranks.agree("committing", finalize)
        except StageFailed as failure:
            return self._discard(commit, failure)
        return written

    def _discard(self, commit: RenameCommit, failure: StageFailed) -> NotWritten:
        if self.ranks.committer:
            commit.discard()
        return NotWritten(str(failure))


def _nothing() -> None:
    """The stage of a rank with nothing to do in it (it still takes part in the agreement)."""


# -- one rank of a run ----------------------------------------------------------------------------------------------


@dataclass
class RankRun:
    """One thread rank: its runtime, its sink, and the save events its bus published."""

    rank: int
    runtime: Runtime
    sink: RecordingSink
    events: list[tuple[int, SaveEvent]] = field(default_factory=list)
    """``(the step of the boundary where it was published, the event)``."""

    def seen(self) -> list[tuple[str, int, int]]:
        """``(event, the save's step, the boundary's step)`` of every save event, in order."""
        return [(type(e).__name__, e.step, at) for at, e in self.events]

    def methods(self) -> list[tuple[str, int]]:
        """The sink's calls after ``start``: ``(method, step)``, poll's wait written as ``poll(wait)``."""
        return [
            (f"poll({'wait' if c.wait else 'no wait'})" if c.method == "poll" else c.method, c.step)
            for c in self.sink.calls
            if c.method != "start"
        ]


def config(
    output_dir: Path,
    *,
    check_interval: int = 2,
    save_steps: int | None = None,
    on_save_failure: OnSaveFailure = "continue",
) -> CheckpointConfig:
    """dynamic_checkpoint on, no signals (no handlers from threads), no socket, no launcher watch."""
    return CheckpointConfig(
        output_dir=str(output_dir),
        save_steps=save_steps,
        dynamic_checkpoint=DynamicCheckpointConfig(
            enabled=True,
            check_interval=check_interval,
            signals=SignalsConfig(sigint="none", sigterm="none", sighup="none", sigusr1="none"),
            socket=SocketConfig(enabled=False),
            on_launcher_exit="none",
            on_save_failure=on_save_failure,
        ),
    )


def start_rank(
    rank: int,
    collective: ThreadCollective,
    cfg: CheckpointConfig,
    sink: RecordingSink,
    *,
    sources: tuple[object, ...] = (),
) -> RankRun:
    """Build and start this rank's runtime (collective: every rank calls it)."""
    runtime = Runtime(cfg, sink, sources=sources)
    run = RankRun(rank, runtime, sink)
    for name in ("save_started", "save_completed", "save_failed"):
        runtime.bus.subscribe(name, lambda event: run.events.append((runtime.last_step, event)))
    runtime.start(Ranks.of(collective, rank=rank, local_rank=rank, save_on_each_node=False))
    return run


@pytest.fixture
def ranks_of(tmp_path: Path) -> Iterator[Callable[..., list[RankRun]]]:
    """``ranks_of(world_size, body, sink=..., **config)``: run ``body(run)`` on every rank after starting it.

    Every runtime is aborted at the end (a no-op after ``close``), so a test that fails half-way leaves no lock
    held. ``sink``: a function of the rank giving its sink (default: a synchronous one).
    """
    started: list[RankRun] = []
    lock = threading.Lock()

    def run_all(
        world_size: int,
        body: Callable[[RankRun], object],
        *,
        sink: Callable[[int], RecordingSink] = lambda rank: RecordingSink(),
        sources: Callable[[int], tuple[object, ...]] = lambda rank: (),
        group: ThreadGroup | None = None,
        **settings: Any,
    ) -> list[RankRun]:
        cfg = config(tmp_path, **settings)

        def rank_body(rank: int, collective: ThreadCollective) -> RankRun:
            run = start_rank(rank, collective, cfg, sink(rank), sources=sources(rank))
            with lock:
                started.append(run)
            try:
                body(run)
            except BaseException:
                run.runtime.abort("the test failed")  # no collective: safe while other ranks wait in one
                raise
            return run

        return (group or ThreadGroup(world_size)).run(rank_body)

    yield run_all
    for run in started:
        run.runtime.abort("the test ended")


def train(run: RankRun, steps: range, before: dict[int, Callable[[], object]] | None = None) -> int | None:
    """Step boundaries of ``steps`` (``before[step]`` runs first on this rank); the step where training
    stopped, or None."""
    for step in steps:
        if before and step in before:
            before[step]()
        if run.runtime.step_boundary(step):
            return step
    return None


def on_rank(run: RankRun, rank: int, action: Callable[[], object]) -> Callable[[], object]:
    """``action`` on rank ``rank`` only (what a request from one rank's trigger looks like)."""
    return action if run.rank == rank else lambda: None


def event_log(output_dir: Path) -> list[tuple[str, int]]:
    """``(event, step)`` of the save events in the run's event log (rank 0 writes it)."""
    lines = (output_dir / EVENT_LOG_NAME).read_text(encoding="utf-8").splitlines()
    return [
        (e["event"], e["step"])
        for e in map(json.loads, lines)
        if e["event"] in ("SaveStarted", "SaveCompleted", "SaveFailed")
    ]


def committed(output_dir: Path) -> list[int]:
    """The steps of complete checkpoints; fails if a staging directory was left next to them."""
    staging = [p.name for p in output_dir.iterdir() if p.name.startswith(STAGING_PREFIX)]
    assert staging == [], f"staging left behind: {staging}"
    return [c.step for c in list_checkpoints(output_dir)]


def committed_or_staging(output_dir: Path) -> tuple[list[int], bool]:
    """(complete checkpoints' steps, whether a staging directory is there)."""
    staging = any(p.name.startswith(STAGING_PREFIX) for p in output_dir.iterdir())
    return [c.step for c in list_checkpoints(output_dir)], staging


def same_on_every_rank(runs: list[RankRun]) -> list[tuple[str, int, int]]:
    """The save events every rank saw (asserted equal across ranks)."""
    seen = runs[0].seen()
    for run in runs[1:]:
        assert run.seen() == seen, f"rank {run.rank} saw {run.seen()}, rank 0 saw {seen}"
    return seen


# -- the fake exchange itself ---------------------------------------------------------------------------------------


def test_the_thread_exchange_pairs_the_kth_calls_and_a_started_vote_is_read_after_other_collectives() -> None:
    def body(rank: int, collective: ThreadCollective) -> tuple[list[int], list[Any], str, list[int]]:
        started = collective.start([rank, -rank])  # read only after two more collectives: no barrier, no deadlock
        gathered = collective.all_gather({"rank": rank})
        name = collective.broadcast_name(f"name-{rank}")
        return started.wait(), gathered, name, collective([10 * rank])

    results = run_ranks(3, body)
    assert results == [([2, 0], [{"rank": 0}, {"rank": 1}, {"rank": 2}], "name-0", [20])] * 3


def test_the_thread_exchange_fails_fast_on_mismatched_calls_a_missing_rank_and_a_raising_rank() -> None:
    def mismatched(rank: int, collective: ThreadCollective) -> object:
        return collective.all_gather(rank) if rank == 1 else collective([rank])

    with pytest.raises(CollectiveMismatch, match="do not call the same collectives"):
        run_ranks(2, mismatched)

    def missing(rank: int, collective: ThreadCollective) -> object:
        return collective([rank]) if rank == 0 else None

    with pytest.raises(CollectiveTimeout, match=r"for ranks \[1\], which never reached it"):
        run_ranks(2, missing, timeout=0.5)

    def raising(rank: int, collective: ThreadCollective) -> object:
        if rank == 2:
            raise ValueError("rank 2 broke")
        return collective([rank])  # would wait for rank 2: the group is broken instead

    with pytest.raises(ValueError, match="rank 2 broke") as caught:
        run_ranks(3, raising)
    assert caught.value.__notes__ == ["(raised on rank 2 of 3, thread_ranks.run_ranks)"]
    group = ThreadGroup(2)
    group.abort("stop")
    with pytest.raises(GroupBroken, match="stop"):
        group.collective(0)([1])


# -- synchronous saves ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_a_request_on_one_rank_saves_the_same_check_interval_step_on_every_rank(
    ranks_of: Callable[..., list[RankRun]], tmp_path: Path, world_size: int
) -> None:
    """The request is made on the last rank only (not the committer) between two due steps."""
    last = world_size - 1

    def body(run: RankRun) -> None:
        assert train(run, range(1, 6), {3: on_rank(run, last, lambda: run.runtime.request(label="mine"))}) is None
        run.runtime.close()

    runs = ranks_of(world_size, body, check_interval=2)
    assert same_on_every_rank(runs) == [("SaveStarted", 4, 4), ("SaveCompleted", 4, 4)]
    assert all(run.methods() == [("plan", 4), ("execute", 4)] for run in runs)
    assert committed(tmp_path) == [4]
    manifest = read_checkpoint(tmp_path / "checkpoint-4").manifest
    assert (manifest.kind, manifest.reason, manifest.world_size) == ("full", "api", world_size)
    assert sorted(manifest.files) == [f"rank-{r}.txt" for r in range(world_size)]
    # Only the requesting rank knows its request id and label; the reason travels to every rank in the vote.
    for run in runs:
        started = run.events[0][1]
        assert started.reasons == ("api",)
        assert bool(started.request_ids) == (run.rank == last) and bool(started.labels) == (run.rank == last)
    completed = runs[0].events[1][1]
    assert isinstance(completed, SaveCompleted) and completed.path == str(tmp_path / "checkpoint-4")
    assert completed.bytes == manifest.bytes
    assert event_log(tmp_path) == [("SaveStarted", 4), ("SaveCompleted", 4)]


def test_save_steps_saves_at_each_scheduled_step_and_nowhere_else(
    ranks_of: Callable[..., list[RankRun]], tmp_path: Path
) -> None:
    def body(run: RankRun) -> None:
        train(run, range(1, 8))
        run.runtime.close()

    runs = ranks_of(2, body, check_interval=100, save_steps=3)
    assert same_on_every_rank(runs) == [
        ("SaveStarted", 3, 3),
        ("SaveCompleted", 3, 3),
        ("SaveStarted", 6, 6),
        ("SaveCompleted", 6, 6),
    ]
    assert all(e.reasons == ("schedule",) for run in runs for _, e in run.events)
    assert committed(tmp_path) == [3, 6]
    assert read_checkpoint(tmp_path / "checkpoint-6").manifest.reason == "schedule"


def test_an_urgent_source_on_one_rank_has_ranks_vote_every_step_pipelined_into_the_next(
    ranks_of: Callable[..., list[RankRun]], tmp_path: Path
) -> None:
    """A source that declares ``urgent`` makes the ranks vote at every step; an ordinary step's vote is started
    there and read at the next (the thread exchange's ``start``), so a request made at step 3 is saved at 4."""

    def body(run: RankRun) -> None:
        train(run, range(1, 7))
        run.runtime.close()

    # The same sources on every rank (their reasons must line up); it fires on rank 1 only.
    runs = ranks_of(2, body, check_interval=100, sources=lambda rank: (Tick(3 if rank == 1 else None),))
    assert same_on_every_rank(runs) == [("SaveStarted", 4, 4), ("SaveCompleted", 4, 4)]
    assert runs[0].events[0][1].reasons == ("tick",)
    assert read_checkpoint(tmp_path / "checkpoint-4").manifest.reason == "tick"


class Tick:
    """A source of the user's own that must be honoured within a step (``urgent``): it asks at ``fire_at``."""

    reason = "tick"
    urgent = True

    def __init__(self, fire_at: int | None) -> None:
        self.fire_at = fire_at
        self.bus = Bus()

    def start(self, bus: Bus, run: RunInfo) -> None:
        self.bus = bus

    def poll(self, step: int) -> None:
        if step == self.fire_at:
            self.bus.publish(SaveRequested(reason="tick"))

    def close(self) -> None:
        pass


def test_a_framework_save_while_a_pipelined_vote_is_in_flight_keeps_the_ranks_collectives_in_line(
    ranks_of: Callable[..., list[RankRun]], tmp_path: Path
) -> None:
    """Step 3's vote (carrying rank 1's request) is started, then the framework's own save of step 3 runs its
    collectives while that vote is still unread; the request is saved at step 4."""

    def body(run: RankRun) -> None:
        runtime = run.runtime
        train(run, range(1, 3))
        assert not runtime.step_boundary(3, framework_saves=True)
        runtime.framework_saved(3)
        assert not runtime.step_boundary(4)
        runtime.framework_saved(4)
        runtime.close()

    runs = ranks_of(
        2,
        body,
        sink=lambda rank: RecordingSink("deferred"),
        check_interval=100,
        sources=lambda rank: (Tick(3 if rank == 1 else None),),
    )
    assert same_on_every_rank(runs) == [
        ("SaveStarted", 3, 3),
        ("SaveCompleted", 3, 3),
        ("SaveStarted", 4, 4),
        ("SaveCompleted", 4, 4),
    ]
    assert [e.reasons for _, e in runs[0].events] == [("schedule",), ("schedule",), ("tick",), ("tick",)]
    assert committed(tmp_path) == [3, 4]


def test_the_shared_memory_votes_work_between_thread_ranks(
    ranks_of: Callable[..., list[RankRun]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ``CKPTBUS_VOTES=collective`` the ranks (one process here) vote through plugins/shared_votes.py."""
    monkeypatch.delenv(VOTES_ENV)

    def body(run: RankRun) -> None:
        assert run.runtime._votes is not None, "the ranks did not open the shared votes"
        train(run, range(1, 5), {3: on_rank(run, 1, run.runtime.request)})
        run.runtime.close()
        assert run.runtime._votes is None, "close() did not close the shared votes"

    runs = ranks_of(2, body, check_interval=2)
    assert same_on_every_rank(runs) == [("SaveStarted", 4, 4), ("SaveCompleted", 4, 4)]
    assert committed(tmp_path) == [4]


# -- asynchronous saves ---------------------------------------------------------------------------------------------


def test_an_async_save_is_polled_until_every_writer_ended_and_requests_wait_for_its_commit(
    ranks_of: Callable[..., list[RankRun]], tmp_path: Path
) -> None:
    pending: dict[int, object] = {}

    def body(run: RankRun) -> None:
        runtime = run.runtime

        def before_step_5() -> None:
            pending[run.rank] = runtime.status()["pending_requests"]
            on_rank(run, 1, run.sink.end_writer)()

        train(
            run,
            range(1, 7),
            {
                2: on_rank(run, 0, lambda: runtime.request(label="first")),
                3: on_rank(run, 0, lambda: runtime.request(label="second")),
                # Rank 0's writer ends before step 4, rank 1's before step 5: committed at step 5 on both.
                4: on_rank(run, 0, run.sink.end_writer),
                5: before_step_5,
            },
        )
        run.runtime.close()

    runs = ranks_of(2, body, sink=lambda rank: RecordingSink("async"), check_interval=2)
    # No new decision while one is in flight: the request of step 3 waits past the due step 4 and is saved at 6.
    assert same_on_every_rank(runs) == [
        ("SaveStarted", 2, 2),
        ("SaveCompleted", 2, 5),
        ("SaveStarted", 6, 6),
        ("SaveCompleted", 6, 6),  # settled by close()
    ]
    assert pending == {0: 1, 1: 0}, "the second request was not pending (on rank 0) while the first was in flight"
    assert all(
        run.methods()
        == [
            ("plan", 2),
            ("begin", 2),
            ("poll(no wait)", 2),
            ("poll(no wait)", 2),
            ("poll(no wait)", 2),
            ("plan", 6),
            ("begin", 6),
            ("poll(wait)", 6),
        ]
        for run in runs
    ), [run.methods() for run in runs]
    assert committed(tmp_path) == [2, 6]
    assert read_checkpoint(tmp_path / "checkpoint-2").manifest.labels == ["first"]
    assert read_checkpoint(tmp_path / "checkpoint-6").manifest.labels == ["second"]


def test_a_scheduled_step_waits_for_the_async_save_in_flight_and_is_saved_itself(
    ranks_of: Callable[..., list[RankRun]], tmp_path: Path
) -> None:
    def body(run: RankRun) -> None:
        train(run, range(1, 5), {2: on_rank(run, 0, run.runtime.request)})
        run.runtime.close()

    runs = ranks_of(2, body, sink=lambda rank: RecordingSink("async"), check_interval=2, save_steps=4)
    assert same_on_every_rank(runs) == [
        ("SaveStarted", 2, 2),
        ("SaveCompleted", 2, 4),  # the writer never ended by itself: step 4 waited for it
        ("SaveStarted", 4, 4),
        ("SaveCompleted", 4, 4),
    ]
    assert runs[1].methods()[:4] == [("plan", 2), ("begin", 2), ("poll(no wait)", 2), ("poll(wait)", 2)]
    assert runs[1].events[2][1].reasons == ("schedule",)
    assert committed(tmp_path) == [2, 4]


def test_exit_after_with_an_async_save_commits_it_before_step_boundary_returns_true_on_every_rank(
    ranks_of: Callable[..., list[RankRun]], tmp_path: Path
) -> None:
    stopped_at: dict[int, int | None] = {}

    def body(run: RankRun) -> None:
        stopped_at[run.rank] = train(
            run, range(1, 5), {2: on_rank(run, 0, lambda: run.runtime.request(exit_after=True))}
        )
        assert run.runtime.stopped
        run.runtime.close()

    runs = ranks_of(2, body, sink=lambda rank: RecordingSink("async"), check_interval=2)
    assert stopped_at == {0: 2, 1: 2}
    assert same_on_every_rank(runs) == [("SaveStarted", 2, 2), ("SaveCompleted", 2, 2)]
    assert all(run.methods() == [("plan", 2), ("begin", 2), ("poll(wait)", 2)] for run in runs)
    assert all(run.runtime.exit_code == 0 for run in runs), "a stop nobody signalled exits 0"
    assert committed(tmp_path) == [2]


@pytest.mark.parametrize(
    ("reason", "exit_code"), [("signal:SIGTERM", 143), ("signal:SIGINT", 130), ("signal:SIGHUP", 129), ("api", 0)]
)
def test_a_stop_asked_on_one_rank_stops_every_rank_with_the_exit_code_of_what_asked(
    ranks_of: Callable[..., list[RankRun]], tmp_path: Path, reason: str, exit_code: int
) -> None:
    """What the signal source publishes, published by hand on rank 1's bus (no handler from a thread): the
    signal's number travels in the vote, so every rank exits with 128 + it."""

    def body(run: RankRun) -> None:
        ask = on_rank(run, 1, lambda: run.runtime.bus.publish(SaveRequested(reason=reason, exit_after=True)))
        assert train(run, range(1, 5), {2: ask}) == 2
        run.runtime.close()

    runs = ranks_of(2, body, check_interval=2)
    assert [run.runtime.exit_code for run in runs] == [exit_code, exit_code]
    assert same_on_every_rank(runs) == [("SaveStarted", 2, 2), ("SaveCompleted", 2, 2)]
    assert read_checkpoint(tmp_path / "checkpoint-2").manifest.reason == reason


# -- failures -------------------------------------------------------------------------------------------------------

FAILING = [  # (mode, the method whose stage fails on rank 1, the stage, where it fails, where the next save lands)
    pytest.param("sync", "execute", "writing", 2, 4, id="sync-execute"),
    pytest.param("async", "begin", "copying the state to host memory", 2, 6, id="async-begin"),
    pytest.param("async", "poll", "writing", 3, 6, id="async-poll"),
    pytest.param("deferred", "poll", "writing", 2, 4, id="deferred-poll"),
]


def _fail_once(run: RankRun, mode: str, steps: range) -> int | None:
    """Saves asked for at steps 2 and 4 (on rank 0); async writers end before step 3 (so the second one is settled
    by close); the framework makes a deferred save right after its boundary."""
    runtime = run.runtime

    def boundary(step: int) -> bool:
        stop: bool = runtime.step_boundary(step)
        if mode == "deferred" and run.sink.in_flight:
            runtime.framework_saved(step)
        return stop or bool(runtime.stopped)

    for step in steps:
        if step == 2 and run.rank == 0:
            runtime.request(label="doomed")
        if step == 3:
            run.sink.end_writer()
        if step == 4 and run.rank == 0:
            runtime.request(label="after")
        if boundary(step):
            return step
    return None


@pytest.mark.parametrize(("mode", "method", "stage", "failed_at", "next_at"), FAILING)
def test_a_stage_failing_on_one_rank_fails_the_save_on_every_rank_with_its_words_and_training_goes_on(
    ranks_of: Callable[..., list[RankRun]],
    tmp_path: Path,
    mode: SaveMode,
    method: str,
    stage: str,
    failed_at: int,
    next_at: int,
) -> None:
    def body(run: RankRun) -> None:
        assert _fail_once(run, mode, range(1, 7)) is None
        run.runtime.close()

    runs = ranks_of(2, body, sink=lambda rank: RecordingSink(mode, fail=(method, 1)), check_interval=2)
    assert same_on_every_rank(runs) == [
        ("SaveStarted", 2, 2),
        ("SaveFailed", 2, failed_at),
        ("SaveStarted", 4, 4),  # training went on, and the next request was saved
        ("SaveCompleted", 4, next_at),
    ]
    words = f"{stage} failed on rank 1: OSError: [Errno {errno.ENOSPC}] No space left on device (rank 1, in {method})"
    for run in runs:
        failed = run.events[1][1]
        assert isinstance(failed, SaveFailed) and failed.error == words, (run.rank, failed)
        assert run.runtime.exit_code == 0 and run.runtime.failed_save is None
    assert committed(tmp_path) == [4]
    assert event_log(tmp_path) == [("SaveStarted", 2), ("SaveFailed", 2), ("SaveStarted", 4), ("SaveCompleted", 4)]


@pytest.mark.parametrize(("mode", "method", "stage", "failed_at", "next_at"), FAILING)
def test_with_on_save_failure_stop_every_rank_stops_at_the_failed_save_and_exits_1(
    ranks_of: Callable[..., list[RankRun]],
    tmp_path: Path,
    mode: SaveMode,
    method: str,
    stage: str,
    failed_at: int,
    next_at: int,
) -> None:
    stopped_at: dict[int, int | None] = {}

    def body(run: RankRun) -> None:
        stopped_at[run.rank] = _fail_once(run, mode, range(1, 7))
        run.runtime.close()

    runs = ranks_of(
        2, body, sink=lambda rank: RecordingSink(mode, fail=(method, 1)), check_interval=2, on_save_failure="stop"
    )
    assert stopped_at == {0: failed_at, 1: failed_at}
    assert same_on_every_rank(runs) == [("SaveStarted", 2, 2), ("SaveFailed", 2, failed_at)]
    for run in runs:
        assert run.runtime.exit_code == 1
        failed = run.runtime.failed_save
        assert failed is not None and failed.error.startswith(f"{stage} failed on rank 1: ")
    assert committed(tmp_path) == []


# -- deferred saves (the framework writes) --------------------------------------------------------------------------


def test_a_deferred_save_is_completed_when_the_framework_saved_and_fails_when_it_did_not(
    ranks_of: Callable[..., list[RankRun]], tmp_path: Path
) -> None:
    def body(run: RankRun) -> None:
        runtime = run.runtime
        train(run, range(1, 3), {2: on_rank(run, 0, runtime.request)})
        runtime.framework_saved(2)  # the Trainer's on_save at step 2
        train(run, range(3, 5), {4: on_rank(run, 0, runtime.request)})
        train(run, range(5, 6))  # the framework did not save step 4: it fails here
        runtime.close()

    runs = ranks_of(2, body, sink=lambda rank: RecordingSink("deferred"), check_interval=2)
    assert same_on_every_rank(runs) == [
        ("SaveStarted", 2, 2),
        ("SaveCompleted", 2, 2),
        ("SaveStarted", 4, 4),
        ("SaveFailed", 4, 5),
    ]
    assert all(
        run.methods() == [("plan", 2), ("begin", 2), ("poll(wait)", 2), ("plan", 4), ("begin", 4), ("abandon", 4)]
        for run in runs
    )
    failed = runs[0].events[3][1]
    assert isinstance(failed, SaveFailed) and failed.error == "the framework did not save at the agreed step"
    assert [c.step for c in list_checkpoints(tmp_path)] == [2]


def test_framework_saves_without_a_request_and_a_save_of_its_own_are_recorded_as_scheduled(
    ranks_of: Callable[..., list[RankRun]], tmp_path: Path
) -> None:
    def body(run: RankRun) -> None:
        runtime = run.runtime
        assert not runtime.step_boundary(3, framework_saves=True)  # the Trainer's save_strategy saves step 3
        runtime.framework_saved(3)
        assert not runtime.step_boundary(5)
        runtime.framework_saved(5)  # a save the framework made on its own (an epoch's end)
        runtime.close()

    runs = ranks_of(2, body, sink=lambda rank: RecordingSink("deferred"), check_interval=100)
    assert same_on_every_rank(runs) == [
        ("SaveStarted", 3, 3),
        ("SaveCompleted", 3, 3),
        ("SaveStarted", 5, 5),
        ("SaveCompleted", 5, 5),
    ]
    assert all(e.reasons == ("schedule",) for run in runs for _, e in run.events)
    assert [c.manifest.reason for c in list_checkpoints(tmp_path)] == ["schedule", "schedule"]


# -- a step already on disk -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["full", "weights"])
def test_a_request_for_a_step_already_saved_is_answered_from_disk_without_a_second_write(
    ranks_of: Callable[..., list[RankRun]], tmp_path: Path, kind: str
) -> None:
    def body(run: RankRun) -> None:
        train(run, range(1, 3), {2: on_rank(run, 0, run.runtime.request)})
        if run.rank == 0:
            run.runtime.request(kind, label="again")  # after step 2's save: close() serves it at step 2
        run.runtime.close()

    runs = ranks_of(2, body, check_interval=2)
    assert same_on_every_rank(runs) == [("SaveStarted", 2, 2), ("SaveCompleted", 2, 2), ("SaveCompleted", 2, 2)]
    first, again = runs[0].events[1][1], runs[0].events[2][1]
    assert isinstance(first, SaveCompleted) and isinstance(again, SaveCompleted)
    assert (again.path, again.bytes, again.seconds, again.kind) == (first.path, first.bytes, 0.0, "full")
    assert again.labels == ("again",)
    assert all([m for m, _ in run.methods()].count("execute") == 1 for run in runs)


# -- the end --------------------------------------------------------------------------------------------------------


def test_close_serves_pending_requests_at_the_last_step_on_every_rank(
    ranks_of: Callable[..., list[RankRun]], tmp_path: Path
) -> None:
    def body(run: RankRun) -> None:
        train(run, range(1, 4), {3: on_rank(run, 1, run.runtime.request)})
        run.runtime.close()

    runs = ranks_of(2, body, check_interval=100)
    assert same_on_every_rank(runs) == [("SaveStarted", 3, 3), ("SaveCompleted", 3, 3)]
    assert committed(tmp_path) == [3]


def test_close_settles_the_async_save_in_flight_first_then_serves_what_is_pending(
    ranks_of: Callable[..., list[RankRun]], tmp_path: Path
) -> None:
    def body(run: RankRun) -> None:
        train(run, range(1, 4), {2: on_rank(run, 0, run.runtime.request), 3: on_rank(run, 0, run.runtime.request)})
        run.runtime.close()

    runs = ranks_of(2, body, sink=lambda rank: RecordingSink("async"), check_interval=2)
    assert same_on_every_rank(runs) == [
        ("SaveStarted", 2, 2),
        ("SaveCompleted", 2, 3),
        ("SaveStarted", 3, 3),
        ("SaveCompleted", 3, 3),
    ]
    writes = [call for call in runs[0].methods() if call[0] != "plan"]
    assert writes == [("begin", 2), ("poll(no wait)", 2), ("poll(wait)", 2), ("begin", 3), ("poll(wait)", 3)]
    assert committed(tmp_path) == [2, 3]


def test_close_fails_a_request_the_deferring_framework_can_no_longer_save(
    ranks_of: Callable[..., list[RankRun]], tmp_path: Path
) -> None:
    def body(run: RankRun) -> None:
        train(run, range(1, 4), {3: on_rank(run, 0, lambda: run.runtime.request(label="late"))})
        run.runtime.close()

    runs = ranks_of(2, body, sink=lambda rank: RecordingSink("deferred"), check_interval=100)
    assert same_on_every_rank(runs) == [("SaveFailed", 3, 3)]
    failed = runs[0].events[0][1]
    assert isinstance(failed, SaveFailed) and failed.error == "training ended before the framework could save"
    assert failed.labels == ("late",)
    assert committed(tmp_path) == []


def test_close_fails_a_deferred_save_the_framework_never_made(
    ranks_of: Callable[..., list[RankRun]], tmp_path: Path
) -> None:
    def body(run: RankRun) -> None:
        train(run, range(1, 3), {2: on_rank(run, 0, run.runtime.request)})
        run.runtime.close()  # the framework never saved step 2

    runs = ranks_of(2, body, sink=lambda rank: RecordingSink("deferred"), check_interval=2)
    assert same_on_every_rank(runs) == [("SaveStarted", 2, 2), ("SaveFailed", 2, 2)]
    failed = runs[1].events[1][1]
    assert isinstance(failed, SaveFailed)
    assert failed.error == "training ended before the checkpoint was committed; it was not made visible"
    assert all(run.methods()[-1] == ("abandon", 2) for run in runs)
    assert list_checkpoints(tmp_path) == []


@pytest.mark.parametrize("end", ["close(serve=False)", "abort"])
def test_close_without_serving_and_abort_fail_what_is_pending_and_in_flight_without_any_collective(
    ranks_of: Callable[..., list[RankRun]], tmp_path: Path, end: str
) -> None:
    group = ThreadGroup(2)
    calls: dict[int, tuple[int, int]] = {}
    why = "training ended" if end == "close(serve=False)" else "rank 1 was lost"

    def body(run: RankRun) -> None:
        runtime = run.runtime
        train(run, range(1, 4), {2: on_rank(run, 0, runtime.request), 3: on_rank(run, 0, runtime.request)})
        before = group.calls[run.rank]
        if end == "abort":
            runtime.abort(why)
        else:
            runtime.close(serve=False)
        calls[run.rank] = (before, group.calls[run.rank])

    runs = ranks_of(2, body, sink=lambda rank: RecordingSink("async"), check_interval=2, group=group)
    assert all(before == after for before, after in calls.values()), f"collectives made while ending: {calls}"
    in_flight = f"{why} before the checkpoint was committed; it was not made visible"
    for run in runs:
        failed = [(e.step, e.error) for _, e in run.events if isinstance(e, SaveFailed)]
        expected = [(2, in_flight)] + ([(3, f"{why} before the request could be served")] if run.rank == 0 else [])
        assert failed == expected, (run.rank, failed)
        assert run.methods()[-1] == ("abandon", 2)
    assert committed_or_staging(tmp_path) == ([], True), "an abandoned save was made visible"
    acquire(tmp_path).release()  # the output_dir is free for the next run


def test_abort_on_one_rank_while_the_other_does_nothing_returns_without_waiting_for_it(
    ranks_of: Callable[..., list[RankRun]], tmp_path: Path
) -> None:
    """Rank 1 stands still (a rank that died, as far as rank 0 can tell) until rank 0's abort returned: a
    collective in abort would wait for it and fail this test after the thread exchange's timeout (2 s here)."""
    group = ThreadGroup(2, timeout=2.0)
    aborted = threading.Event()

    def body(run: RankRun) -> None:
        runtime = run.runtime
        train(run, range(1, 4), {2: on_rank(run, 0, runtime.request), 3: on_rank(run, 0, runtime.request)})
        if run.rank == 0:
            before = group.calls[0]
            runtime.abort("rank 1 was lost")
            assert group.calls[0] == before
            aborted.set()
        else:
            assert aborted.wait(10), "rank 0's abort did not return while rank 1 stood still"
            runtime.abort("rank 0 ended")

    runs = ranks_of(2, body, sink=lambda rank: RecordingSink("async"), check_interval=2, group=group)
    assert [e.error.split(" before ")[0] for _, e in runs[0].events if isinstance(e, SaveFailed)] == [
        "rank 1 was lost",
        "rank 1 was lost",
    ]
    assert [c.step for c in list_checkpoints(tmp_path)] == []


def test_close_twice_and_abort_after_close_are_safe_and_publish_nothing_more(
    ranks_of: Callable[..., list[RankRun]], tmp_path: Path
) -> None:
    def body(run: RankRun) -> None:
        train(run, range(1, 3), {2: on_rank(run, 0, run.runtime.request)})
        run.runtime.close()
        seen = list(run.events)
        run.runtime.close()
        run.runtime.close(serve=False)
        run.runtime.abort("again")
        assert run.events == seen

    runs = ranks_of(2, body, check_interval=2)
    assert same_on_every_rank(runs) == [("SaveStarted", 2, 2), ("SaveCompleted", 2, 2)]
    acquire(tmp_path).release()


def test_only_the_runtime_publishes_save_outcomes(ranks_of: Callable[..., list[RankRun]], tmp_path: Path) -> None:
    """The sink has no bus: every save event comes from the runtime, one ``save_started`` and one outcome per
    save on each rank (a sink that published too would show up twice)."""
    published: dict[int, list[str]] = {}

    def body(run: RankRun) -> None:
        assert not any(isinstance(value, Bus) for value in vars(run.sink).values())
        train(run, range(1, 5), {2: on_rank(run, 0, run.runtime.request), 4: on_rank(run, 1, run.runtime.request)})
        run.runtime.close()
        published[run.rank] = [type(e).__name__ for _, e in run.events]

    ranks_of(2, body, sink=lambda rank: RecordingSink("async"), check_interval=2)
    assert published == {r: ["SaveStarted", "SaveCompleted", "SaveStarted", "SaveCompleted"] for r in (0, 1)}


# -- start ----------------------------------------------------------------------------------------------------------


class Quiet:
    """A source that never asks: only its traits matter here."""

    def __init__(self, *, reason: str | None = None, urgent: bool = False) -> None:
        if reason is not None:
            self.reason = reason
        self.urgent = urgent

    def start(self, bus: Bus, run: RunInfo) -> None:
        pass

    def poll(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def _start_refused(tmp_path: Path, sources: Callable[[int], tuple[object, ...]]) -> None:
    """Every rank's start() raises SetupError; a failed start holds nothing once aborted (no collective)."""

    def body(rank: int, collective: ThreadCollective) -> None:
        runtime = Runtime(config(tmp_path), RecordingSink(), sources=sources(rank))
        try:
            with pytest.raises(SetupError, match="votes would not line up"):
                runtime.start(Ranks.of(collective, rank=rank, local_rank=rank, save_on_each_node=False))
        finally:
            runtime.abort("start failed")

    run_ranks(2, body)
    acquire(tmp_path).release()  # the lock start() took before it refused is released


def test_start_refuses_ranks_whose_sources_declare_different_reasons_on_every_rank(tmp_path: Path) -> None:
    _start_refused(tmp_path, lambda rank: (Quiet(reason="mine"),) if rank == 1 else ())


def test_start_refuses_ranks_whose_sources_differ_in_urgency(tmp_path: Path) -> None:
    _start_refused(tmp_path, lambda rank: (Quiet(urgent=True),) if rank == 0 else ())


# -- a rank fails: the ranks still alive save on their own (plugins/rescue.py; end to end: test_crash_rescue.py) ----


def test_an_error_on_every_rank_drops_the_async_save_in_flight_and_saves_the_last_step_once(
    ranks_of: Callable[..., list[RankRun]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(VOTES_ENV)  # the rescue needs the shared file the votes go through
    lines: dict[int, str | None] = {}

    def body(run: RankRun) -> None:
        train(run, range(1, 5), {2: on_rank(run, 0, run.runtime.request)})  # begun at 2, its writers never end
        lines[run.rank] = run.runtime.fail(ValueError("loss is NaN"))
        assert not run.runtime.running

    runs = ranks_of(2, body, sink=lambda rank: RecordingSink("async"), check_interval=2)
    assert all(("SaveFailed", 2, 4) in run.seen() for run in runs), "the save in flight was not made visible"
    writers = [run for run in runs if ("rescue", 4) in run.methods()]
    assert len(writers) == 1, [run.methods() for run in runs]
    assert writers[0].seen()[-2:] == [("SaveStarted", 4, 4), ("SaveCompleted", 4, 4)]
    # The abandoned save's staging stays, never listed, until the next start removes it (as after any abort).
    assert committed_or_staging(tmp_path) == ([4], True)
    manifest = read_checkpoint(tmp_path / "checkpoint-4").manifest
    assert manifest.reason == "error", manifest and manifest.failure is not None
    assert manifest.failure["ranks"] == [0, 1] and manifest.failure["error"] == "ValueError: loss is NaN"
    assert (tmp_path / "checkpoint-4" / "rank-1.txt").read_text() == "rank 1 state", "each rank's own state"
    assert lines[0] == lines[1] and lines[0] is not None and "saved a full checkpoint of step 4" in lines[0]


class RaisesOnRank:
    """A user's trigger source whose ``poll`` raises on one rank at one step (training raised there, alone)."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step, self.mine = rank, step, False

    def start(self, bus: Bus, run: RunInfo) -> None:
        self.mine = run.rank == self.rank

    def poll(self, step: int) -> None:
        if self.mine and step == self.step:
            raise RuntimeError("CUDA out of memory")

    def close(self) -> None:
        pass


def test_a_rank_that_raises_alone_ends_the_vote_of_the_others_with_a_rank_failure_naming_the_checkpoint(
    ranks_of: Callable[..., list[RankRun]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(VOTES_ENV)
    raised: dict[int, BaseException] = {}

    def body(run: RankRun) -> None:
        with pytest.raises((RankFailure, RuntimeError)) as failure:
            train(run, range(1, 5))  # rank 1 raises at step 2; rank 0's vote there learns it will never vote
        raised[run.rank] = failure.value

    ranks_of(2, body, check_interval=2, sources=lambda rank: (RaisesOnRank(1, 2),))
    assert type(raised[1]) is RuntimeError, "the rank that raised keeps its own exception"
    assert isinstance(raised[0], RankFailure), raised[0]
    assert committed(tmp_path) == [2]
    message = str(raised[0])
    assert message.startswith("training failed: rank 1 (pid ") and "raised RuntimeError: CUDA out of memory" in message
    assert f"saved a full checkpoint of step 2 in {tmp_path / 'checkpoint-2'}" in message
    manifest = read_checkpoint(tmp_path / "checkpoint-2").manifest
    assert manifest.reason == "rank_failure" and manifest.failure is not None
    assert manifest.failure["ranks"] == [1] and manifest.failure["survivors"] == [0]
    assert manifest.failure["exact"] is True
