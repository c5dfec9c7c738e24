"""Two "machines" on one host, through accelerate's own launcher.

Each node is its own ``accelerate launch --multi_gpu --num_machines 2
--machine_rank R --main_process_ip 127.0.0.1 --main_process_port P
--num_processes 2`` (``--num_processes`` is the total over all machines,
so one rank per node). Checked: a shared ``output_dir``, and one
``output_dir`` per node with ``save_on_each_node: true``; the trigger file
lives with the main process (node 0); every node ends with the same
complete checkpoint and resumes from it exactly.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from runs import BIN, REPO, TrainingRun

from ckptbus import checkpoint_path, list_checkpoints
from testkit.procs import free_port

pytestmark = pytest.mark.slow

DATA = {"dataset_size": 64, "micro_batch_size": 4, "sequence_len": 16, "max_steps": 20}

Nodes = Callable[..., list[TrainingRun]]

STARTUP = 300.0
"""Seconds two launchers of two ranks each may take to reach step 2: four processes importing torch on two busy
cores took more than the default 120 s once in a full suite run (38 s alone)."""


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Nodes]:
    """``nodes(outputs=[dir0, dir1], config={...}, extra_args=[...])`` starts both machines; killed at teardown."""
    runs: list[TrainingRun] = []

    def start(outputs: list[Path], config: dict[str, Any], extra_args: tuple[str, ...] = ()) -> list[TrainingRun]:
        port = free_port()
        started = []
        for machine, out in enumerate(outputs):
            name = f"node{machine}-{len(runs)}"
            run = TrainingRun(tmp_path, config={**config, "output_dir": str(out)}, name=name)
            command = [
                str(BIN / "accelerate"),
                "launch",
                "--multi_gpu",
                "--num_machines",
                "2",
                "--machine_rank",
                str(machine),
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                str(port),
                "--num_processes",
                "2",
                str(REPO / "train.py"),
                "--config",
                str(run.config_path),
                *extra_args,
            ]
            runs.append(run.start(command))
            started.append(run)
        return started

    yield start
    for run in runs:
        run.kill()


def finish(runs: list[TrainingRun], expect: int = 0) -> None:
    for run in runs:
        code = run.wait_exit(timeout=180)
        assert code == expect, f"{run.log_path.name} exited with {code}\n{run.log_tail()}"


def losses(rows: list[dict[str, Any]]) -> dict[int, float]:
    return {int(r["step"]): float(r["loss"]) for r in rows}


def test_shared_output_dir(nodes: Nodes, tmp_path: Path) -> None:
    out = tmp_path / "shared"
    config = {**DATA, "dynamic_checkpoint": {"check_interval": 3}}
    first = nodes([out, out], config)
    main = first[0]
    assert len(main.wait_for_ranks(1)) == 1 and len(first[1].wait_for_ranks(1)) == 1, "one rank per machine"
    main.wait_for_step(2, timeout=STARTUP)
    (out / "axolotl_checkpoint.save").touch()
    finish(first)
    [ckpt] = list_checkpoints(out)
    assert ckpt.manifest.reason == "file" and ckpt.manifest.world_size == 2
    assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors"} <= set(ckpt.manifest.files)
    rows_before = len(main.metrics())

    second = nodes([out, out], config, ("--resume-from-checkpoint", "latest"))
    finish(second)
    for run in second:
        assert f"resumed from {ckpt.path} at step {ckpt.step}" in run.log()
    resumed = losses(main.metrics()[rows_before:])
    assert sorted(resumed) == list(range(ckpt.step + 1, 21))
    reference = losses(main.metrics()[:rows_before])
    assert all(resumed[s] == reference[s] for s in resumed), "resumed losses differ"


def test_output_dir_per_node_with_save_on_each_node(nodes: Nodes, tmp_path: Path) -> None:
    """One output_dir per node with ``save_on_each_node``, in one job and its restarts (each launch of two nodes
    costs about a minute on two cores, so one job proves three things):

    1. a file-triggered checkpoint and the scheduled ones land on every node, each node with its own rank's
       RNG state;
    2. node 1 loses its newest checkpoint: resuming from ``latest`` is refused on every node before training;
    3. with the file-triggered checkpoint the newest on both nodes again, every node resumes from it exactly.
    """
    outs = [tmp_path / "node0", tmp_path / "node1"]
    config = {**DATA, "save_steps": 10, "save_on_each_node": True, "dynamic_checkpoint": {"check_interval": 3}}
    first = nodes(outs, config)
    first[0].wait_for_step(2, timeout=STARTUP)
    (outs[0] / "axolotl_checkpoint.save").touch()  # with the main process: node 0's directory
    finish(first)
    steps = [[c.step for c in list_checkpoints(out)] for out in outs]
    [step] = [c.step for c in list_checkpoints(outs[0]) if c.manifest.reason == "file"]
    # The trigger is seen on a multiple of check_interval (3): never a scheduled step (10, 20).
    assert steps[0] == sorted({step, 10, 20}) and steps[0] == steps[1], (
        f"every node holds the same checkpoints: {steps}"
    )
    for machine, out in enumerate(outs):
        for info in list_checkpoints(out):
            # Model and optimizer on every node; the RNG state of the node's own rank.
            assert {"model.safetensors", "optimizer.bin", f"random_states_{machine}.pkl"} <= set(info.manifest.files)
        assert not [p for p in out.iterdir() if p.name.startswith(".ckptbus-")]
    assert not (outs[1] / "metrics.jsonl").exists(), "metrics are written by the main process only"
    rows_before = len(first[0].metrics())
    assert rows_before == 20

    # 2. Node 1 lost its newest checkpoint: the nodes' "latest" differ.
    shutil.rmtree(checkpoint_path(outs[1], 20))
    node1_latest = max(s for s in steps[1] if s != 20)
    refused = nodes(outs, config, ("--resume-from-checkpoint", "latest"))
    finish(refused, expect=1)  # torchrun's status when a worker failed; the worker's own is 2
    for run in refused:
        message = f"ranks found different checkpoints for 'latest' (steps {node1_latest} to 20)"
        assert message in run.log(), run.log_tail()
        assert "exitcode  : 2" in run.log()
    assert len(first[0].metrics()) == rows_before, "nothing trained after the refusal"

    # 3. The file-triggered checkpoint the newest on every node: each resumes from it and repeats the losses.
    for out in outs:
        for info in list_checkpoints(out):
            if info.step > step:
                shutil.rmtree(info.path)
    second = nodes(outs, config, ("--resume-from-checkpoint", "latest"))
    finish(second)
    for machine, run in enumerate(second):
        assert f"resumed from {checkpoint_path(outs[machine], step)} at step {step}" in run.log()
    resumed = losses(first[0].metrics()[rows_before:])
    reference = losses(first[0].metrics()[:rows_before])
    assert sorted(resumed) == list(range(step + 1, 21))
    assert all(resumed[s] == reference[s] for s in resumed), "resumed losses differ"


def test_an_output_dir_that_does_not_match_save_on_each_node_is_refused_at_start(nodes: Nodes, tmp_path: Path) -> None:
    """Found at start-up, before any step, instead of at the first save: every node exits 2 with the reason.

    One directory per node without ``save_on_each_node``, launched; the check itself, with both wrong layouts
    (a shared directory with ``save_on_each_node`` too) and both right ones, runs in process on thread ranks in
    tests/test_output_dir_layout.py.
    """
    outs = [tmp_path / "node0", tmp_path / "node1"]
    runs = nodes(outs, {**DATA})
    finish(runs, expect=1)  # accelerate's launcher reports the ranks' status 2 as 1
    for run in runs:
        assert "is not shared between machines" in run.log(), run.log_tail()
        assert run.last_step() == 0, "no step ran"
    for out in outs:
        assert list_checkpoints(out) == []
        assert not [p for p in out.iterdir() if p.name.startswith(".ckptbus-")], "the probe was removed"
