"""The start-up check that ``output_dir``'s sharing between machines matches ``save_on_each_node``, in process.

``check_output_dir_layout`` (plugins/distributed.py) runs on every rank with
a real exchange between 4 thread ranks (tests/thread_ranks.py): two
"machines" of two ranks, rank 0 the main process and rank 2 the local main
process of machine 1. A machine's ``output_dir`` is a real directory: one
for both machines (shared) or one each. Every layout, both ways of getting
it wrong and both right ones, plus a single machine; tests/test_multinode.py
launches a wrong one for real (train.py refuses it before any step).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from ckptbus.plugins.distributed import check_output_dir_layout
from thread_ranks import ThreadCollective, run_ranks

from ckptbus import SetupError
from ckptbus._names import PROBE_PREFIX

RANKS_PER_MACHINE = 2


def check_on_every_rank(dirs: list[Path], save_on_each_node: bool, machines: int = 2) -> list[str | None]:
    """Run the check on ``machines`` x 2 thread ranks, machine m writing to ``dirs[m]``; each rank's refusal
    (``SetupError``'s message) or None."""

    def rank_fn(rank: int, exchange: ThreadCollective) -> str | None:
        machine = rank // RANKS_PER_MACHINE
        try:
            check_output_dir_layout(
                dirs[machine],
                exchange,
                is_main=rank == 0,
                is_local_main=rank % RANKS_PER_MACHINE == 0,
                save_on_each_node=save_on_each_node,
            )
        except SetupError as exc:
            return str(exc)
        return None

    return run_ranks(machines * RANKS_PER_MACHINE, rank_fn)


def no_probe_left(dirs: list[Path]) -> bool:
    return not [p for d in set(dirs) for p in d.iterdir() if p.name.startswith(PROBE_PREFIX)]


@pytest.mark.parametrize(
    ("layout", "save_on_each_node", "refusal"),
    [
        pytest.param("shared", True, "is shared between machines", id="shared dir, save_on_each_node"),
        pytest.param("per-node", False, "is not shared between machines", id="dir per node, no save_on_each_node"),
        pytest.param("shared", False, None, id="shared dir"),
        pytest.param("per-node", True, None, id="dir per node, save_on_each_node"),
    ],
)
def test_every_rank_refuses_an_output_dir_that_does_not_match_save_on_each_node(
    tmp_path: Path, layout: str, save_on_each_node: bool, refusal: str | None
) -> None:
    dirs = [tmp_path / "shared"] * 2 if layout == "shared" else [tmp_path / "node0", tmp_path / "node1"]
    for d in dirs:
        d.mkdir(exist_ok=True)
    messages = check_on_every_rank(dirs, save_on_each_node)
    if refusal is None:
        assert messages == [None] * 4, messages
    else:
        for rank, message in enumerate(messages):  # each rank names its own machine's output_dir
            assert message is not None and refusal in message, (rank, messages)
            assert repr(str(dirs[rank // RANKS_PER_MACHINE])) in message, (rank, message)
    assert no_probe_left(dirs), "the probe was removed"


@pytest.mark.parametrize("save_on_each_node", [True, False])
def test_one_machine_writes_nothing_and_refuses_nothing(tmp_path: Path, save_on_each_node: bool) -> None:
    assert check_on_every_rank([tmp_path], save_on_each_node, machines=1) == [None, None]
    assert list(tmp_path.iterdir()) == [], "no probe written on one machine"
