"""Asynchronous full saves (``dynamic_checkpoint.async_save``).

In one process: the snapshot and writer produce the files ``accelerator.save_state`` writes, with the same
contents, in buffers reused from one save to the next. In real 2-rank runs: a trigger gives a complete,
loadable checkpoint; resuming from it repeats the losses of an uninterrupted run; a writer that fails on one
rank fails the save on every rank; Ctrl+C while a save is in flight still ends with it committed.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from runs import TrainingRun

from ckptbus import list_checkpoints, read_checkpoint
from ckptbus._layout import STAGING_PREFIX
from testkit.procs import limit_file_size

pytestmark = pytest.mark.slow  # torch, and real runs

Launch = Callable[..., TrainingRun]
ASYNC = {"check_interval": 2, "async_save": True}
DATA = {"dataset_size": 64, "micro_batch_size": 4, "sequence_len": 16}


def _tiny_training() -> tuple[Any, Any, Any]:
    """A one-process Accelerator with a tied-weights GPT-2, AdamW and a scheduler, trained two steps."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import GPT2Config, GPT2LMHeadModel

    accelerator = Accelerator(cpu=True)
    set_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=32, n_positions=16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    def train_step() -> None:
        ids = torch.randint(0, 32, (2, 8))
        accelerator.backward(model(input_ids=ids, labels=ids).loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

    return accelerator, model, train_step


def _load(path: Path) -> Any:
    import torch
    from safetensors.torch import load_file

    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, weights_only=False)


def _same(a: Any, b: Any) -> bool:
    import numpy as np
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray):
        return bool(np.array_equal(a, b))
    return bool(a == b)


def test_snapshot_writes_what_save_state_writes_and_reuses_its_buffers(tmp_path: Path) -> None:
    from accelerate.state import AcceleratorState, PartialState
    from ckptbus.plugins.saving.async_writer import HostSnapshot, WriteJob

    accelerator, model, train_step = _tiny_training()
    try:
        snapshots = HostSnapshot()
        for round_ in range(2):  # the second round reuses the buffers of the first
            train_step()
            expected, written = tmp_path / f"save_state{round_}", tmp_path / f"async{round_}"
            written.mkdir()
            accelerator.save_state(str(expected))
            buffers = {k: v.data_ptr() for k, v in snapshots._buffers.items()}
            job = WriteJob(snapshots.take(accelerator), written)
            if round_ == 1:
                assert {k: v.data_ptr() for k, v in snapshots._buffers.items()} == buffers

            # As the sink does: optimizer.step() waits until the writer copied the parameters and optimizer state.
            def hold_step(*_: Any, job: WriteJob = job) -> None:
                job.wait_copied()

            hook = accelerator._optimizers[0].optimizer.register_step_pre_hook(hold_step)
            job.start()
            train_step()  # training goes on while the writer runs: the files must still hold the earlier step
            hook.remove()
            job.wait()
            assert job.error is None and job.copied.is_set()
            names = sorted(p.name for p in expected.iterdir())
            assert sorted(p.name for p in written.iterdir()) == names
            assert "random_states_0.pkl" in names and "model.safetensors" in names
            for name in names:
                assert _same(_load(expected / name), _load(written / name)), name
            before = [p.detach().clone() for p in model.parameters()]
            accelerator.load_state(str(written))
            after = list(model.parameters())
            assert not all(x.equal(y) for x, y in zip(before, after, strict=True)), "load_state restored nothing"
    finally:
        AcceleratorState._reset_state(True)
        PartialState._reset_state()


def test_a_change_in_place_while_the_writer_copies_fails_the_save_instead_of_mixing_two_steps(tmp_path: Path) -> None:
    import torch
    from accelerate.state import AcceleratorState, PartialState
    from ckptbus.plugins.saving.async_writer import HostSnapshot, WriteJob

    accelerator, model, train_step = _tiny_training()
    try:
        train_step()
        job = WriteJob(HostSnapshot().take(accelerator), tmp_path)
        assert job.snapshot.deferred, "the parameters and the optimizer state are copied by the writer"
        with torch.no_grad():  # outside optimizer.step(), before the writer copied it
            next(iter(model.parameters())).add_(1.0)
        job.start()
        job.wait()
        assert job.error is not None and "changed in place outside optimizer.step()" in job.error, job.error
        assert "async_save: false" in job.error
        assert not (tmp_path / "model.safetensors").exists(), "nothing is written from a torn copy"
    finally:
        AcceleratorState._reset_state(True)
        PartialState._reset_state()


def test_one_save_in_flight_requests_wait_for_its_commit_and_close_commits_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One process (exchange = identity). The writer's file writes (after its copies of the state) are held on an
    Event so that "still writing" lasts as long as the test needs: the only stand-in here, since a real write's
    duration cannot be chosen."""
    import threading

    from accelerate.state import AcceleratorState, PartialState
    from ckptbus.plugins import DynamicCheckpoint
    from ckptbus.plugins.saving import async_writer

    from ckptbus import CheckpointConfig, DynamicCheckpointConfig

    release = threading.Event()
    real_save = async_writer.save

    def held_save(*args: Any, **kwargs: Any) -> None:
        release.wait()
        real_save(*args, **kwargs)

    monkeypatch.setattr(async_writer, "save", held_save)
    accelerator, _, train_step = _tiny_training()
    try:
        config = CheckpointConfig(
            output_dir=str(tmp_path),
            save_steps=6,
            dynamic_checkpoint=DynamicCheckpointConfig(check_interval=1, event_log=False, async_save=True),
        )
        ckpt = DynamicCheckpoint(accelerator, config)
        events: list[Any] = []
        ckpt.bus.subscribe("save_started", events.append)
        ckpt.bus.subscribe("save_completed", events.append)
        train_step()
        ckpt.request(label="first")
        ckpt.step(1)
        assert [type(e).__name__ for e in events] == ["SaveStarted"]
        for step in (2, 3):  # in flight: nothing committed, a new request waits
            ckpt.request(label="second")
            train_step()
            ckpt.step(step)
        assert [type(e).__name__ for e in events] == ["SaveStarted"] and list_checkpoints(tmp_path) == []
        assert ckpt.status()["pending_requests"] == 2
        release.set()
        train_step()
        ckpt.step(4)  # the writer may still run: committed at this step or a later one, then the waiting requests
        for step in (5, 6):
            train_step()
            ckpt.step(step)
        kinds = [(type(e).__name__, e.step) for e in events]
        assert kinds[:2] == [("SaveStarted", 1), ("SaveCompleted", 1)], kinds
        assert ("SaveStarted", 6) in kinds, "the scheduled save at step 6 was not skipped"
        ckpt.close()  # commits what is in flight
        assert {c.step for c in list_checkpoints(tmp_path)} >= {1, 6}
        assert ckpt.status()["pending_requests"] == 0
        manifest = read_checkpoint(tmp_path / "checkpoint-1").manifest
        assert manifest.labels == ["first"] and manifest.stall_seconds > 0 and manifest.write_seconds > 0
    finally:
        release.set()
        AcceleratorState._reset_state(True)
        PartialState._reset_state()


# -- real 2-rank runs -------------------------------------------------------------------------------------------


def _outcomes(run: TrainingRun) -> list[dict[str, Any]]:
    return [e for e in run.events() if e["event"] in ("SaveCompleted", "SaveFailed")]


def _trigger_and_wait(run: TrainingRun, timeout: float = 180.0) -> dict[str, Any]:
    seen = len(_outcomes(run))
    (run.output_dir / "axolotl_checkpoint.save").touch()
    return dict(run.wait_for(lambda: _outcomes(run)[seen:][:1], "the outcome of the save", timeout)[0])


def _staging(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith(STAGING_PREFIX))


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_trigger_commits_a_loadable_checkpoint_and_resume_repeats_the_losses(
    launch: Launch, tmp_path: Path, writer: str
) -> None:
    max_steps = 40
    dyn = {**ASYNC, "async_writer": writer}
    run = launch(processes=2, config={**DATA, "max_steps": max_steps, "dynamic_checkpoint": dyn}, name="ref")
    run.wait_for_step(2)
    done = _trigger_and_wait(run)
    assert done["event"] == "SaveCompleted", done
    assert run.wait_exit(180) == 0, run.log_tail()
    (ckpt,) = list_checkpoints(run.output_dir)
    manifest = read_checkpoint(ckpt.path).manifest
    assert (manifest.kind, manifest.reason, manifest.world_size) == ("full", "file", 2)
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "random_states_1.pkl"} <= set(
        manifest.files
    )
    assert (done["stall_seconds"], done["write_seconds"]) == (manifest.stall_seconds, manifest.write_seconds)
    assert manifest.stall_seconds > 0 and manifest.write_seconds > 0
    assert _staging(run.output_dir) == []

    # accelerator.load_state reads it, and the resumed run repeats the uninterrupted one bit for bit.
    out = tmp_path / "resumed"
    resumed = launch(
        processes=2,
        config={**DATA, "max_steps": max_steps, "output_dir": str(out), "dynamic_checkpoint": {"enabled": False}},
        extra_args=["--resume-from-checkpoint", str(ckpt.path)],
        name="resumed",
    )
    assert resumed.wait_exit(180) == 0, resumed.log_tail()
    reference = {int(r["step"]): float(r["loss"]) for r in run.metrics()}
    again = {int(r["step"]): float(r["loss"]) for r in resumed.metrics()}
    assert sorted(again) == list(range(ckpt.step + 1, max_steps + 1))
    assert {s: (reference[s], again[s]) for s in again if again[s] != reference[s]} == {}


def test_a_writer_that_fails_on_one_rank_fails_the_save_on_every_rank(launch: Launch) -> None:
    """On rank 0 (the committer), then on rank 1, in the same run; with the limit lifted the next save succeeds."""
    run = launch(processes=2, config={"model": {"n_layer": 1, "n_head": 2, "n_embd": 64}, "dynamic_checkpoint": ASYNC})
    pids = run.wait_for_ranks()
    run.wait_for_step(2)
    first = _trigger_and_wait(run)
    assert first["event"] == "SaveCompleted", first
    saved = [first["step"]]

    for rank in (0, 1):
        # As in test_lifecycle_failures: rank 1 writes only random_states_1.pkl (about 14 kB); rank 0 the model
        # (about 210 kB) and the run's logs, which need room to grow.
        sizes = [p.stat().st_size for p in (run.log_path, run.output_dir / "metrics.jsonl")]
        limit_file_size(pids[rank], 4096 if rank == 1 else max(sizes) + 64 * 1024)
        failed = _trigger_and_wait(run)
        assert failed["event"] == "SaveFailed", failed
        assert failed["error"].startswith(f"writing failed on rank {rank}: "), failed["error"]
        assert [c.step for c in list_checkpoints(run.output_dir)] == saved
        assert _staging(run.output_dir) == []
        assert run.wait_for_step(failed["step"] + 4), "training goes on after a failed save"

        limit_file_size(pids[rank], None)
        again = _trigger_and_wait(run)
        assert again["event"] == "SaveCompleted", again
        saved.append(again["step"])
        assert [c.step for c in list_checkpoints(run.output_dir)] == saved


# About 50M parameters (600 MB with AdamW's state): writing takes seconds, so a signal lands while it is in flight.
BIG = {"model": {"n_layer": 1, "n_head": 4, "n_embd": 2048, "vocab_size": 32}, "micro_batch_size": 1, "sequence_len": 8}


def _in_flight(run: TrainingRun) -> None:
    """Trigger a save and wait until it is being written in the background."""
    run.wait_for(lambda: len(run.metrics()) >= 3, "three steps of the big run", timeout=300)
    (run.output_dir / "axolotl_checkpoint.save").touch()
    run.wait_for(lambda: _staging(run.output_dir), "the staging directory of the save", timeout=300)
    run.wait_for(lambda: "SaveStarted" in [e["event"] for e in run.events()], "the save started", timeout=300)


def test_ctrl_c_while_a_save_is_in_flight_commits_it_then_saves_and_exits(launch: Launch) -> None:
    run = launch(processes=2, config={**BIG, "dynamic_checkpoint": ASYNC})
    run.wait_for_ranks(timeout=300)
    _in_flight(run)
    os.killpg(run.pid, signal.SIGINT)
    assert run.wait_exit(300) == 1, run.log_tail()  # torchrun exits 1 when its workers exit 130
    log = run.log()
    checkpoints = [(c.manifest.kind, c.manifest.reason) for c in list_checkpoints(run.output_dir)]
    assert checkpoints == [("full", "file"), ("weights", "signal:SIGINT")], run.log_tail()
    assert _staging(run.output_dir) == []
    if log.index("SIGINT received") > log.index("saved full checkpoint"):
        # The outcome above holds either way; only the path taken differs. A write of 600 MB outlasts a step
        # by far, so this is rare, and a timing outside the test's control must not fail it.
        pytest.skip("the save was committed before the signal arrived: the in-flight path was not exercised")


def test_a_second_ctrl_c_while_a_save_is_in_flight_leaves_none_complete(launch: Launch) -> None:
    """Ctrl+C asks for a full save and exit: the save starts, training waits for its writer; a second press aborts."""
    signals = {"sigint": "full_exit", "debounce_seconds": 0.2}
    run = launch(processes=2, config={**BIG, "dynamic_checkpoint": {**ASYNC, "signals": signals}})
    run.wait_for_ranks(timeout=300)
    run.wait_for(lambda: len(run.metrics()) >= 3, "three steps of the big run", timeout=300)
    os.killpg(run.pid, signal.SIGINT)
    first_press = time.monotonic()
    run.wait_for(lambda: _staging(run.output_dir), "the staging directory of the save", timeout=300)
    while time.monotonic() - first_press < 0.5:  # beyond debounce_seconds (0.2), or it counts as the same press
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGINT)  # torchrun turns a second press into SIGTERM for the ranks: abort
    run.wait_exit(300)
    assert list_checkpoints(run.output_dir) == [], f"the interrupted save looks complete\n{run.log_tail()}"
    assert "aborting now; a checkpoint being written is not completed" in run.log()
