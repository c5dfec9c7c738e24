"""One rank of a real gloo run of the shared-memory votes (started by tests/test_shared_votes.py).

Usage, with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in the environment:

    python shared_votes_rank.py SCENARIO RESULT.json

Every rank opens ``SharedVotes`` (collective), plays SCENARIO and writes what
it saw to RESULT.json; the test checks the results of all ranks together.
The exchange given to ``open`` is the real one (``TorchExchange`` over gloo).
Ranks leave with ``os._exit`` so that a peer that left on purpose cannot hang
the shutdown of torch.distributed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from datetime import timedelta
from typing import Any

import torch
from accelerate import Accelerator
from ckptbus.plugins.distributed import TorchExchange
from ckptbus.plugins.shared_votes import SharedVotes, SharedVotesError

LENGTH = 10
ROUNDS = 200
PATTERN_SEED = 1234  # the same on every rank: the ranks must start their votes in the same order


def vote_of(rank: int, round_: int) -> list[int]:
    """Rank ``rank``'s vote in round ``round_`` (tests/test_shared_votes.py computes the same)."""
    vote = [((round_ * 7 + rank * 3 + slot * 5) % 11) - 5 for slot in range(LENGTH)]
    vote[-1] = (rank + 1) * 2**40 * (1 if (round_ + rank) % 2 else -1)  # far beyond 32 bits, both signs
    return vote


def vote_file_links() -> list[str]:
    """Where this process's open file descriptors to a vote file point (``/proc/self/fd``)."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if "ckptbus-votes-" in target:
            links.append(target)
    return links


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def finish(result: dict[str, Any], path: str, code: int = 0) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(result, fh)
    sys.stdout.flush()
    os._exit(code)


def timed_vote(votes: SharedVotes, vote: list[int], result: dict[str, Any]) -> None:
    """One blocking vote that is expected to fail: what it raised and how long it took to."""
    started = time.monotonic()
    try:
        result["vote"] = votes(vote)
    except SharedVotesError as exc:
        result["error"] = error_text(exc)
    result["elapsed"] = time.monotonic() - started


def agree(votes: SharedVotes, rank: int, result: dict[str, Any]) -> None:
    """ROUNDS votes, blocking and pipelined in turn, with ranks drifting apart by random sleeps."""
    result["links_after_first_vote"] = None
    pattern = random.Random(PATTERN_SEED)
    drift = random.Random(rank)
    results: dict[int, list[int]] = {}
    modes: list[str] = []
    pending: tuple[int, Any] | None = None  # (round, the started vote not read yet)

    def read_pending() -> None:
        nonlocal pending
        if pending is not None:
            round_, started = pending
            results[round_] = started.wait()
            assert started.wait() == results[round_], "a second wait() gives the same result"
            pending = None

    for round_ in range(ROUNDS):
        if drift.random() < 0.3:
            time.sleep(drift.uniform(0, 0.004))
        vote = vote_of(rank, round_)
        mode = pattern.choice(["block", "block_then_read", "pipe"])
        modes.append(mode)
        if mode == "block":  # read the one in flight first, then vote and wait
            read_pending()
            results[round_] = votes(vote)
        elif mode == "block_then_read":  # a blocking vote beside the one in flight, read after it
            results[round_] = votes(vote)
            read_pending()
        else:  # the Coordinator's every-step vote: read the previous one, start this one
            read_pending()
            pending = (round_, votes.start(vote))
        if round_ == 0:
            result["links_after_first_vote"] = vote_file_links()
    read_pending()
    result["modes"] = modes
    result["results"] = {str(r): v for r, v in sorted(results.items())}
    votes.close()
    votes.close()  # safe twice
    result["links_after_close"] = vote_file_links()


def main() -> None:
    scenario, result_path = sys.argv[1], sys.argv[2]
    logging.basicConfig(stream=sys.stdout, format="%(message)s")
    logging.getLogger("ckptbus").setLevel(logging.DEBUG)  # why open returned None
    accelerator = Accelerator(cpu=True)
    rank, world_size = accelerator.process_index, accelerator.num_processes
    exchange = TorchExchange(accelerator)
    result: dict[str, Any] = {"rank": rank, "world_size": world_size, "scenario": scenario, "pid": os.getpid()}
    timeout = timedelta(seconds={"timeout": 1.5, "gone_unreaped": 3.0}.get(scenario, 30.0))

    started = time.monotonic()
    votes = SharedVotes.open(rank, world_size, LENGTH, exchange, timeout=timeout)
    result["open_seconds"] = time.monotonic() - started
    result["opened"] = votes is not None
    result["links_after_open"] = vote_file_links()
    # The ranks still talk after open, whatever it returned (and they are all past open here).
    result["exchange_after_open"] = exchange([rank * 10 + 1, -rank])

    if votes is None:
        if scenario == "forced_collective":
            # Votes between machines stay off the GPU: over NCCL, on_host() makes a gloo group for them. NCCL
            # cannot run here, so the exchange only says its tensors live on CUDA (none is ever made on it).
            result["on_host_of_gloo_is_itself"] = exchange.on_host() is exchange
            host = TorchExchange.of(world_size, torch.device("cuda")).on_host()
            result["on_host_device"] = str(host.device)
            result["on_host_group_size"] = torch.distributed.get_world_size(host.group) if host.group else 0
            result["on_host_votes"] = [host(vote_of(rank, r)) for r in range(3)]
            result["on_host_votes"].append(host.start(vote_of(rank, 3)).wait())
        finish(result, result_path)
        return

    if scenario == "agree":
        agree(votes, rank, result)
        finish(result, result_path)

    # Every other scenario starts with a few votes that both ranks make.
    result["warmup"] = [votes(vote_of(rank, r)) for r in range(3)]

    if scenario == "closed":
        if rank == 1:
            votes.close()
            try:
                votes([0] * LENGTH)
            except SharedVotesError as exc:
                result["vote_after_close"] = error_text(exc)
            result["links_after_close"] = vote_file_links()
            time.sleep(3)
            finish(result, result_path)
        timed_vote(votes, vote_of(rank, 3), result)
        finish(result, result_path)

    if scenario in ("gone", "gone_unreaped"):
        if rank == 1:
            finish(result, result_path)  # exits without closing its votes
        timed_vote(votes, vote_of(rank, 3), result)
        finish(result, result_path)

    if scenario == "timeout":
        if rank == 1:
            time.sleep(6)  # alive, but does not vote
            finish(result, result_path)
        timed_vote(votes, vote_of(rank, 3), result)
        finish(result, result_path)

    if scenario == "mismatch":
        try:
            votes.start([1, 2, 3])
        except ValueError as exc:
            result["wrong_length"] = error_text(exc)
        # The refused vote took no sequence number: the next vote still pairs with the peer's.
        result["after_wrong_length"] = votes(vote_of(rank, 3))
        exchange([0])  # both ranks have read vote 4: rank 1 may overwrite its slots now
        if rank == 1:
            for r in range(4, 4 + 17):  # 17 votes ahead without reading: its ring of 16 slots wraps
                votes.start(vote_of(rank, r))
        exchange([0])  # rank 1 has written them all
        if rank == 0:
            timed_vote(votes, vote_of(rank, 4), result)
        exchange([0])  # rank 1 stays until rank 0 has read
        finish(result, result_path)

    result["error"] = f"unknown scenario {scenario!r}"
    finish(result, result_path, 2)


if __name__ == "__main__":
    main()
