"""After a failure: the ranks still alive save the last step boundary on their own, with no collective.

When training raises on a rank, or a rank dies (an exception, SIGKILL from
the OOM killer, a segfault, the launcher tearing the group down), the run
cannot go on, but under replicated state every survivor still holds the
whole model, optimizer and scheduler. :func:`rescue` runs on every rank that
gets there (the runtime calls it from the adapter's error path and from a
step boundary whose vote found a rank gone) and goes through the ranks'
shared file only (plugins/rank_mirror.py):

1. this rank says how it stands: ``FAILED`` (it raised, on its own),
   ``RESCUING`` (it saw another rank fail), or ``UNABLE`` (its sink cannot
   write alone: state sharded over the ranks, or held between two steps);
2. the first rank able to write that takes the writer's lock writes the
   checkpoint of its last step boundary alone (:meth:`Sink.rescue`): the
   replicated state of its own, the RNG states of every rank from the copies
   each kept of that step; then records the outcome in the shared file;
3. the others wait for that record (a writer that dies releases the lock and
   the next one writes), or stop waiting once no live rank could write,
   or at :data:`RESCUE_SECONDS` (within torchrun's 30 s between SIGTERM and
   SIGKILL).

Nothing here waits on a dead rank, and nothing publishes: the runtime
publishes the outcome this module returns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from ckptbus._coordinator import Decision
from ckptbus._errors import CheckpointError
from ckptbus._events import SaveKind
from ckptbus._layout import checkpoint_path, latest_full, read_checkpoint
from ckptbus._sink import NotWritten, Outcome, SaveRecord, Sink

from .rank_mirror import FAILED, RESCUING, RUNNING, SETTLING, UNABLE, PeerState, RankMirror

RESCUE_SECONDS = 25.0
"""How long a rank waits for the rescue: torchrun SIGKILLs the survivors 30 s after its SIGTERM."""

SETTLE_SECONDS = 1.0
"""How long a rank that raised waits to see whether another rank failed first (its exception may be the
consequence: a collective whose peer died), or raised too (an error on every rank)."""


@dataclass(frozen=True, slots=True)
class Rescued:
    """What the rescue did, for the runtime to publish and log."""

    line: str
    """The one line that says who failed, how, and what was saved where (or why nothing was)."""
    decision: Decision | None = None
    """The save this rank wrote (None: another rank wrote it, or nothing was written)."""
    outcome: Outcome | None = None
    speaker: bool = True
    """Whether this rank logs :attr:`line`: the writer; where nobody wrote, the lowest rank still alive."""


def rescue(
    mirror: RankMirror | None,
    sink: Sink,
    *,
    output_dir: Path,
    step: int,
    start_step: int,
    kind: SaveKind | None,
    error: BaseException | None,
) -> Rescued:
    """Run the rescue on this rank (module docstring). ``step``: this rank's last step boundary; ``start_step``:
    the step training started (or resumed) at; ``kind``: what ``on_error`` saves (None: nothing); ``error``: what
    this rank raised, if it raised."""
    if mirror is None and kind is None:
        return Rescued(f"training failed at step {step}; nothing saved (dynamic_checkpoint.on_error is none)")
    if mirror is None:
        return Rescued(  # (every rank says it: with nothing shared, none knows which others are alive)
            f"training failed at step {step}, and the ranks share no memory (several machines, or "
            f"CKPTBUS_VOTES=collective), so no checkpoint can be saved without the failed rank; {_newest(output_dir)}"
        )
    mirror.mark(SETTLING)  # (the votes of the others stop waiting for this rank at once)
    someone_gone = _settle(mirror, own_error=error)
    why = sink.rescue_unsupported() if kind is not None else "dynamic_checkpoint.on_error is none"
    # An error is this rank's own unless another rank is gone: then it is the echo of that death (a collective
    # whose peer closed its connections), and this rank is a survivor.
    raised = error is not None and not someone_gone
    message = (f"{type(error).__name__}: {error}".splitlines() or [""])[0] if raised else ""
    mirror.mark(UNABLE if why is not None else FAILED if raised else RESCUING, message)
    if why is not None and kind is None:
        return _unsaved(mirror, f"nothing saved ({why}); {_newest(output_dir)}")
    if step <= start_step:
        return _unsaved(mirror, f"no step completed since training started at step {step}; {_newest(output_dir)}")
    deadline = time.monotonic() + RESCUE_SECONDS
    while True:
        done = mirror.rescued()
        if done is not None:
            return Rescued(done[2], speaker=False)
        if why is None and mirror.try_claim():
            try:
                done = mirror.rescued()  # (written by a rank that held the lock just before)
                if done is not None:
                    return Rescued(done[2], speaker=False)
                assert kind is not None
                rescued = _write(mirror, sink, output_dir=output_dir, step=step, kind=kind, error=message)
                mirror.record_rescue(step, rescued.line)
                return rescued
            finally:
                mirror.release()
        if why is not None and not any(p.alive and p.status != UNABLE for p in _others(mirror.peers(), mirror.rank)):
            return _unsaved(
                mirror, f"nothing saved: no rank still alive can write one alone ({why}); {_newest(output_dir)}"
            )
        if time.monotonic() >= deadline:
            return _unsaved(mirror, f"no rank saved a checkpoint within {RESCUE_SECONDS:.0f} s; {_newest(output_dir)}")
        time.sleep(0.05)


def _unsaved(mirror: RankMirror, what: str) -> Rescued:
    """Nothing was written: the lowest rank still alive says so, and who failed."""
    _wait_settled(mirror)
    peers = mirror.peers()
    return Rescued(f"{_who(peers)}; {what}", speaker=mirror.rank == min(p.rank for p in peers if p.alive))


def _settle(mirror: RankMirror, *, own_error: BaseException | None) -> bool:
    """Whether another rank is gone. A rank that raised gives the others :data:`SETTLE_SECONDS` to show it: its
    error may be the echo of a death (a collective whose peer closed its connections), or they may stop for the
    same cause (an error on every rank)."""
    deadline = time.monotonic() + (SETTLE_SECONDS if own_error is not None else 0.0)
    while True:
        others = _others(mirror.peers(), mirror.rank)
        stopped = [p for p in others if not p.alive or p.status != RUNNING]
        if own_error is None or any(not p.alive for p in others) or len(stopped) == len(others):
            break
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    return any(not p.alive for p in _others(mirror.peers(), mirror.rank))


def _wait_settled(mirror: RankMirror) -> None:
    """Give the ranks still finding out how they stand :data:`SETTLE_SECONDS` to say it."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while time.monotonic() < deadline:
        if not any(p.alive and p.status == SETTLING for p in _others(mirror.peers(), mirror.rank)):
            return
        time.sleep(0.02)


def _write(mirror: RankMirror, sink: Sink, *, output_dir: Path, step: int, kind: SaveKind, error: str) -> Rescued:
    """Write the checkpoint of ``step`` on this rank (it holds the writer's lock)."""
    _wait_settled(mirror)  # (whether every rank raised, and who failed, is known once none is settling)
    peers = mirror.peers()
    who = _who(peers)
    final = checkpoint_path(output_dir, step)
    if _complete(final, kind):
        return Rescued(f"{who}; step {step} was already saved: {final}")
    states: dict[int, bytes] = {}
    stale: list[int] = []
    for peer in peers:
        data = mirror.state_of(peer.rank, step)
        if data is None:
            # A rank that died between its optimizer step and its step boundary left only the step before.
            data = mirror.state_of(peer.rank, step - 1)
            stale.append(peer.rank)
        if data is None:
            return Rescued(
                f"{who}; nothing saved: rank {peer.rank} left no copy of its RNG state; {_newest(output_dir)}"
            )
        states[peer.rank] = data
    failed = [p for p in peers if p.failed]
    # An error every rank raised (a data error, a NaN guard) is "error"; a rank that died or raised alone while the
    # others trained on is "rank_failure".
    every_rank_raised = bool(error) and all(p.message for p in _others(peers, mirror.rank))
    reason = "error" if every_rank_raised else "rank_failure"
    decision = Decision(step, kind, True, (reason,), ())
    record = replace(
        SaveRecord.of(decision, len(peers)),
        failure={
            "ranks": [p.rank for p in failed],
            "how": {str(p.rank): p.how() for p in failed},
            "survivors": [p.rank for p in peers if not p.failed],
            "written_by": mirror.rank,
            "error": error or None,
            "exact": not stale,
        },
    )
    outcome = sink.rescue(record, states)
    if isinstance(outcome, NotWritten):
        line = f"{who}; the checkpoint of step {step} could not be saved: {outcome.error}; {_newest(output_dir)}"
    else:
        exact = (
            "every rank's RNG state is of that step: a resume repeats the run exactly"
            if not stale
            else f"the RNG state of rank(s) {', '.join(map(str, stale))} is of step {step - 1}: a resume will not "
            "repeat the run exactly"
        )
        line = f"{who}; rank {mirror.rank} saved a {kind} checkpoint of step {step} in {outcome.path} ({exact})"
    return Rescued(line, decision, outcome)


def _who(peers: list[PeerState]) -> str:
    """Who failed and how, as the line begins."""
    parts = [f"rank {p.rank} (pid {p.pid}) {p.how()}" for p in peers if p.failed]
    return "training failed: " + ("; ".join(parts) if parts else "a rank stopped voting")


def _others(peers: list[PeerState], rank: int) -> list[PeerState]:
    return [p for p in peers if p.rank != rank]


def _complete(path: Path, kind: SaveKind) -> bool:
    try:
        info = read_checkpoint(path)
    except CheckpointError:
        return False
    return info.manifest.kind == "full" or kind == "weights"


def _newest(output_dir: Path) -> str:
    newest = latest_full(output_dir)
    return (
        f"the newest complete checkpoint is {newest.path}" if newest else f"{output_dir} holds no complete checkpoint"
    )


__all__ = ["RESCUE_SECONDS", "Rescued", "rescue"]
