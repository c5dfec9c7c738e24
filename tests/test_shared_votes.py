"""Shared-memory votes (plugins/shared_votes.py) between real processes over gloo.

Each test starts a few ranks of tests/scripts/shared_votes_rank.py with one
scenario; every rank writes what it saw to its own JSON file and the test
checks them together.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from ckptbus.plugins.shared_votes import VOTES_ENV, SharedVotes, shared_memory_dir
from runs import results_of, run_ranks

SCRIPT = Path(__file__).parent / "scripts" / "shared_votes_rank.py"
LENGTH = 10
ROUNDS = 200
UNSHARE_PRIVATE_SHM = [
    "unshare",
    "-m",
    "-p",
    "-f",
    "--mount-proc",
    "sh",
    "-c",
    'mount -t tmpfs tmpfs /dev/shm && exec "$0" "$@"',
]
UNSHARE_PRIVATE_PIDS = ["unshare", "-m", "-p", "-f", "--mount-proc"]


def vote_of(rank: int, round_: int) -> list[int]:
    """What the rank script votes in round ``round_`` (the same formula as its ``vote_of``)."""
    vote = [((round_ * 7 + rank * 3 + slot * 5) % 11) - 5 for slot in range(LENGTH)]
    vote[-1] = (rank + 1) * 2**40 * (1 if (round_ + rank) % 2 else -1)
    return vote


def deleted_vote_file(links: list[str]) -> str:
    """The path of the one vote file behind ``links`` (from /proc/self/fd), which must be unlinked."""
    assert len(links) == 1, links
    assert links[0].endswith(" (deleted)"), f"the vote file is still in the directory: {links[0]}"
    path = links[0].removesuffix(" (deleted)")
    assert Path(path).name.startswith("ckptbus-votes-") and str(Path(path).parent) == shared_memory_dir()
    return path


# -- without processes ----------------------------------------------------------------------


def test_one_rank_has_no_shared_votes_and_exchanges_nothing() -> None:
    calls: list[list[int]] = []

    def exchange(vote: Any) -> list[int]:
        calls.append(list(vote))
        return list(vote)

    assert SharedVotes.open(0, 1, LENGTH, exchange) is None
    assert calls == [], "with one rank open is not collective"


# -- real ranks -----------------------------------------------------------------------------


@pytest.mark.slow
def test_three_ranks_agree_on_every_vote_blocking_and_pipelined(tmp_path: Path) -> None:
    """200 votes of 3 drifting ranks, blocking and pipelined: each is the element-wise max of the 3 ranks'.

    The vote file is unlinked once open returns (the descriptors keep it) and
    closed by ``close``.
    """
    results = results_of(run_ranks(tmp_path, SCRIPT, "agree", world_size=3))
    assert [result["opened"] for result in results] == [True] * 3
    assert all(result["exchange_after_open"] == [21, 0] for result in results)
    assert all(result["open_seconds"] < 10 for result in results)

    # Rank 0 unlinked the file before open returned; every rank shares that one file.
    deleted_vote_file(results[0]["links_after_open"])
    paths = {deleted_vote_file(result["links_after_first_vote"]) for result in results}
    assert len(paths) == 1, paths
    assert not Path(paths.pop()).exists()
    assert [result["links_after_close"] for result in results] == [[]] * 3, "close closes the file"

    modes = results[0]["modes"]
    assert all(result["modes"] == modes for result in results)
    assert set(modes) == {"block", "block_then_read", "pipe"} and len(modes) == ROUNDS
    for round_ in range(ROUNDS):
        expected = [max(column) for column in zip(*(vote_of(r, round_) for r in range(3)), strict=True)]
        got = [result["results"][str(round_)] for result in results]
        assert got == [expected] * 3, f"round {round_} ({modes[round_]})"
    for r, result in enumerate(results):
        # The check is not trivial: most results differ from the rank's own vote.
        differ = sum(result["results"][str(i)] != vote_of(r, i) for i in range(ROUNDS))
        assert differ > ROUNDS // 2, (r, differ)


@pytest.mark.slow
def test_a_rank_that_closed_makes_the_others_raise_left_the_run(tmp_path: Path) -> None:
    """Rank 1 closes and stays alive; rank 0's next vote raises at once instead of waiting for the timeout."""
    rank0, rank1 = results_of(run_ranks(tmp_path, SCRIPT, "closed"))
    assert rank0["opened"] and rank1["opened"]
    expected = [[max(a, b) for a, b in zip(vote_of(0, r), vote_of(1, r), strict=True)] for r in range(3)]
    assert rank0["warmup"] == rank1["warmup"] == expected
    assert "vote" not in rank0, "there is no vote of rank 1 to combine"
    assert rank0["error"].startswith("SharedVotesError: rank 1 left the run before its vote 4")
    assert rank0["elapsed"] < 5
    assert rank1["vote_after_close"] == "SharedVotesError: the shared votes are closed"
    assert rank1["links_after_close"] == []


@pytest.mark.slow
def test_a_rank_whose_process_is_gone_makes_the_others_raise(tmp_path: Path) -> None:
    """Rank 1 exits without closing its votes; rank 0's next vote raises 'is gone' within seconds."""
    rank0, rank1 = results_of(run_ranks(tmp_path, SCRIPT, "gone"))
    assert rank0["warmup"] == rank1["warmup"]
    assert "vote" not in rank0
    assert rank0["error"].startswith(f"SharedVotesError: rank 1 (pid {rank1['pid']}) is gone; its vote 4 never came")
    assert rank0["elapsed"] < 5


@pytest.mark.slow
def test_a_rank_that_exited_but_is_not_reaped_yet_is_gone_too(tmp_path: Path) -> None:
    """Rank 1 exits without closing while its launcher has not reaped it yet (it waits for rank 0 first).

    Its process is gone, but its pid is a zombie until the launcher waits on
    it. Rank 0 (open with a 3 s timeout) should still say 'is gone'.
    """
    rank0, rank1 = results_of(run_ranks(tmp_path, SCRIPT, "gone_unreaped", unreaped=frozenset({1})))
    assert rank0["warmup"] == rank1["warmup"]
    assert rank0["error"].startswith(f"SharedVotesError: rank 1 (pid {rank1['pid']}) is gone"), rank0["error"]
    assert rank0["elapsed"] < 2.5, "seen at the first liveness check, not at the timeout"


@pytest.mark.slow
def test_a_rank_that_does_not_vote_makes_the_others_raise_after_the_timeout(tmp_path: Path) -> None:
    """Rank 1 is alive but does not vote; rank 0 gives up after the timeout of open (1.5 s), not before."""
    rank0, rank1 = results_of(run_ranks(tmp_path, SCRIPT, "timeout"))
    assert rank0["warmup"] == rank1["warmup"]
    assert "vote" not in rank0
    assert rank0["error"].startswith("SharedVotesError: rank 1 did not vote within ")
    assert "(vote 4)" in rank0["error"]
    assert 1.5 <= rank0["elapsed"] < 5


@pytest.mark.slow
def test_votes_of_the_wrong_length_and_ranks_out_of_step_are_refused(tmp_path: Path) -> None:
    """A vote of the wrong length raises ValueError and takes no sequence number; a rank whose ring wrapped is seen.

    Rank 1 starts 17 votes without reading them, so its slot for the next vote
    holds a newer one: rank 0 must raise instead of combining it.
    """
    rank0, rank1 = results_of(run_ranks(tmp_path, SCRIPT, "mismatch"))
    for result in (rank0, rank1):
        assert result["wrong_length"] == "ValueError: vote has 3 ints, the shared votes take 10"
        assert result["after_wrong_length"] == [max(a, b) for a, b in zip(vote_of(0, 3), vote_of(1, 3), strict=True)]
    assert "vote" not in rank0
    assert rank0["error"].startswith("SharedVotesError: rank 1 is 16 votes ahead of rank 0")
    assert f"{VOTES_ENV}=collective" in rank0["error"]


@pytest.mark.slow
def test_collective_in_the_environment_turns_shared_votes_off_and_nccl_votes_stay_on_the_host(tmp_path: Path) -> None:
    results = results_of(run_ranks(tmp_path, SCRIPT, "forced_collective", env={VOTES_ENV: "collective"}))
    assert [result["opened"] for result in results] == [False, False]
    assert [result["links_after_open"] for result in results] == [[], []], "no vote file was made"
    assert all(result["exchange_after_open"] == [11, 0] for result in results)
    # The collective votes of an NCCL run go through a gloo group on the host (TorchExchange.on_host).
    expected = [[max(a, b) for a, b in zip(vote_of(0, r), vote_of(1, r), strict=True)] for r in range(4)]
    for result in results:
        assert result["on_host_of_gloo_is_itself"] is True
        assert (result["on_host_device"], result["on_host_group_size"]) == ("cpu", 2)
        assert result["on_host_votes"] == expected


def unshare_problem() -> str:
    """Why a private mount and pid namespace cannot be made here ('' when it can)."""
    try:
        done = subprocess.run(
            [*UNSHARE_PRIVATE_SHM[:-1], "mount -t tmpfs tmpfs /dev/shm && echo ok"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare cannot run: {exc}"
    if done.returncode != 0 or done.stdout.strip() != "ok":
        return f"unshare/mount failed ({done.returncode}): {done.stderr.strip()}"
    return ""


@pytest.mark.slow
@pytest.mark.parametrize("private", ["shm", "pids"])
def test_ranks_on_separate_machines_fall_back_to_collectives(tmp_path: Path, private: str) -> None:
    """Ranks that cannot share the vote file or see each other's processes get None from open, and no hang.

    A second machine cannot run here, so rank 1 runs in its own pid and mount
    namespace (``unshare``): with ``shm`` also with its own /dev/shm (it cannot
    open rank 0's file); with ``pids`` the /dev/shm is shared, so only the
    processes are out of sight (like containers that share /dev/shm only).
    Afterwards the ranks still exchange through gloo.
    """
    problem = unshare_problem()
    if problem:
        pytest.skip(problem)
    wrap = UNSHARE_PRIVATE_SHM if private == "shm" else UNSHARE_PRIVATE_PIDS
    ranks = run_ranks(tmp_path, SCRIPT, "separate_machines", wrap={1: wrap})
    results = results_of(ranks)
    assert [result["opened"] for result in results] == [False, False]
    if private == "shm":
        assert "shared votes unavailable on rank 1: cannot open /dev/shm/ckptbus-votes-" in ranks[1].output
        assert "unavailable on rank 0: the ranks do not see the same vote file" in ranks[0].output
    else:
        assert "shared votes unavailable on rank 1: rank 0's process (" in ranks[1].output
        assert "is not visible from rank 1" in ranks[1].output
    assert results[1]["pid"] == 1, "rank 1 ran in its own pid namespace"
    assert [result["links_after_open"] for result in results] == [[], []], "every rank closed the vote file"
    assert all(result["exchange_after_open"] == [11, 0] for result in results)
    assert all(result["open_seconds"] < 10 for result in results)
