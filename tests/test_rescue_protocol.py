"""The rescue after a failure (plugins/rescue.py, plugins/rank_mirror.py), in process, in seconds.

Each rank here is a thread with its own descriptor of one real shared file
(so the writer's ``flock`` is contended between ranks as between processes),
and its own stand-in process: a real ``sleep`` whose pid the mirror watches.
A rank "dies" the way a process does for the others: its stand-in is
SIGKILLed and its descriptor closed (which releases its lock). The sink
writes real checkpoints through the real commit (ckptbus/_commit.py).
End-to-end runs with real ranks, gloo and torchrun are in tests/test_crash_rescue.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from ckptbus.plugins.rank_mirror import RECORD_BYTES, RankMirror, mirror_bytes
from ckptbus.plugins.rescue import Rescued, rescue

from ckptbus import read_checkpoint
from ckptbus._commit import RenameCommit
from ckptbus._sink import NotWritten, Outcome, SaveRecord, Written


class Died(BaseException):
    """This thread's rank died (its stand-in process is gone and its descriptor closed)."""


class FileSink:
    """Writes ``rank-<r>.state`` for every rank's state through the real rename commit."""

    def __init__(self, output_dir: Path, *, unable: str | None = None, die: Callable[[], None] | None = None) -> None:
        self.output_dir = output_dir
        self.unable = unable
        self.die = die
        self.rescues = 0

    def rank_state(self) -> bytes:
        return b""

    def rescue_unsupported(self) -> str | None:
        return self.unable

    def rescue(self, record: SaveRecord, rank_states: Mapping[int, bytes]) -> Outcome:
        self.rescues += 1
        commit = RenameCommit(self.output_dir, record.step)
        commit.create()
        for rank, state in sorted(rank_states.items()):
            (commit.directory / f"rank-{rank}.state").write_bytes(state)
            if self.die is not None:
                self.die()  # in the middle of writing: the staging directory stays half written
        commit.finalize(record, dict, {}, read_back=True)
        return Written(commit.final)


class Cluster:
    """``world_size`` ranks on one shared file: mirrors, stand-in processes, and a way to die."""

    def __init__(self, tmp_path: Path, world_size: int) -> None:
        self.output_dir = tmp_path / "out"
        self.output_dir.mkdir()
        path = tmp_path / "shared"
        with open(path, "wb") as fh:
            fh.truncate(mirror_bytes(world_size))
        self.stand_ins = [subprocess.Popen(["sleep", "600"]) for _ in range(world_size)]
        pids = [p.pid for p in self.stand_ins]
        self.fds = [os.open(path, os.O_RDWR) for _ in range(world_size)]
        self.mirrors = [RankMirror(fd, 0, rank, world_size, pids) for rank, fd in enumerate(self.fds)]

    def record(self, rank: int, steps: range) -> None:
        """Rank ``rank`` passed the step boundaries ``steps``, keeping its state of each."""
        for step in steps:
            self.mirrors[rank].record(step, f"rank {rank} step {step}".encode())

    def die(self, rank: int) -> None:
        self.stand_ins[rank].send_signal(signal.SIGKILL)
        self.stand_ins[rank].wait()
        if self.fds[rank] >= 0:
            os.close(self.fds[rank])
            self.fds[rank] = -1

    def rescue(self, rank: int, sink: FileSink, *, step: int, error: BaseException | None, **kw: Any) -> Rescued:
        return rescue(
            self.mirrors[rank],
            sink,  # type: ignore[arg-type]
            output_dir=self.output_dir,
            step=step,
            start_step=kw.get("start_step", 0),
            kind=kw.get("kind", "full"),
            error=error,
        )

    def on_threads(self, bodies: dict[int, Callable[[], Rescued]]) -> dict[int, Rescued | BaseException]:
        results: dict[int, Rescued | BaseException] = {}

        def run(rank: int, body: Callable[[], Rescued]) -> None:
            try:
                results[rank] = body()
            except BaseException as exc:
                results[rank] = exc

        threads = [threading.Thread(target=run, args=item) for item in bodies.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not any(t.is_alive() for t in threads), "a rank did not finish its rescue within 60 s"
        return results

    def close(self) -> None:
        for proc in self.stand_ins:
            proc.kill()
            proc.wait()
        for fd in self.fds:
            if fd >= 0:
                os.close(fd)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Callable[[int], Cluster]]:
    made: list[Cluster] = []

    def make(world_size: int) -> Cluster:
        made.append(Cluster(tmp_path, world_size))
        return made[-1]

    yield make
    for c in made:
        c.close()


def manifest(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((path / "ckptbus.json").read_text())
    return data


def test_the_survivor_of_a_dead_rank_writes_every_ranks_state_of_the_last_step(
    cluster: Callable[[int], Cluster],
) -> None:
    c = cluster(2)
    c.record(0, range(1, 5))
    c.record(1, range(1, 5))
    c.die(1)
    sink = FileSink(c.output_dir)
    result = c.rescue(0, sink, step=4, error=RuntimeError("Connection closed by peer"))
    assert isinstance(result.outcome, Written) and result.speaker
    final = c.output_dir / "checkpoint-4"
    assert (final / "rank-1.state").read_bytes() == b"rank 1 step 4", "the dead rank's state of step 4"
    assert (final / "rank-0.state").read_bytes() == b"rank 0 step 4"
    m = manifest(final)
    assert m["reason"] == "rank_failure"
    assert m["failure"]["ranks"] == [1] and m["failure"]["survivors"] == [0] and m["failure"]["exact"] is True
    assert "gone without a word" in m["failure"]["how"]["1"]
    assert m["failure"]["error"] is None, "the survivor's error is the echo of the death, not a cause"
    assert result.line.startswith(f"training failed: rank 1 (pid {c.stand_ins[1].pid}) is gone without a word")
    assert "rank 0 saved a full checkpoint of step 4" in result.line and "repeats the run exactly" in result.line
    assert c.mirrors[0].rescued() == (4, 0, result.line), "the others read the outcome from the shared file"


def test_a_writer_that_dies_mid_rescue_releases_the_lock_and_the_next_survivor_writes_afresh(
    cluster: Callable[[int], Cluster],
) -> None:
    c = cluster(3)
    for rank in range(3):
        c.record(rank, range(1, 8))
    c.die(2)
    claimed = threading.Event()

    def rank0_dies() -> None:
        claimed.set()
        c.die(0)
        raise Died

    def rank1() -> Rescued:
        claimed.wait(30)  # rank 0 holds the lock first, and dies while writing
        return c.rescue(1, FileSink(c.output_dir), step=7, error=RuntimeError("gloo: Connection reset by peer"))

    results = c.on_threads(
        {
            0: lambda: c.rescue(0, FileSink(c.output_dir, die=rank0_dies), step=7, error=RuntimeError("gloo")),
            1: rank1,
        }
    )
    assert isinstance(results[0], (Died, OSError)), results[0]  # (releasing a closed descriptor after death)
    written = results[1]
    assert isinstance(written, Rescued) and isinstance(written.outcome, Written), written
    m = manifest(c.output_dir / "checkpoint-7")
    assert m["failure"]["written_by"] == 1 and m["failure"]["ranks"] == [0, 2] and m["failure"]["survivors"] == [1]
    assert sorted(p.name for p in (c.output_dir / "checkpoint-7").iterdir()) == [
        "ckptbus.json",
        "rank-0.state",
        "rank-1.state",
        "rank-2.state",
    ]
    assert not list(c.output_dir.glob(".ckptbus-staging*")), "the dead writer's half-written staging was replaced"


def test_every_rank_raising_is_one_checkpoint_recorded_as_an_error(cluster: Callable[[int], Cluster]) -> None:
    c = cluster(2)
    c.record(0, range(1, 4))
    c.record(1, range(1, 4))
    sinks = [FileSink(c.output_dir), FileSink(c.output_dir)]
    results = c.on_threads(
        {rank: (lambda r=rank: c.rescue(r, sinks[r], step=3, error=ValueError("loss is NaN"))) for rank in (0, 1)}
    )
    assert sum(s.rescues for s in sinks) == 1, "one rank writes, the other reads its outcome"
    m = manifest(c.output_dir / "checkpoint-3")
    assert m["reason"] == "error"
    assert m["failure"]["ranks"] == [0, 1] and m["failure"]["survivors"] == []
    assert m["failure"]["error"] == "ValueError: loss is NaN"
    lines = {r.line for r in results.values() if isinstance(r, Rescued)}
    assert len(lines) == 1 and sum(r.speaker for r in results.values() if isinstance(r, Rescued)) == 1


def test_a_rank_that_raised_alone_saves_while_the_others_train_on(cluster: Callable[[int], Cluster]) -> None:
    """Rank 1 raised in its forward pass; rank 0 waits in a collective for it (alive, still running)."""
    c = cluster(2)
    c.record(0, range(1, 6))
    c.record(1, range(1, 6))
    result = c.rescue(1, FileSink(c.output_dir), step=5, error=RuntimeError("CUDA out of memory"))
    m = manifest(c.output_dir / "checkpoint-5")
    assert m["reason"] == "rank_failure" and m["failure"]["ranks"] == [1] and m["failure"]["survivors"] == [0]
    assert result.line.startswith(f"training failed: rank 1 (pid {c.stand_ins[1].pid}) raised RuntimeError: CUDA out")


def test_a_rank_dead_before_its_last_boundary_leaves_a_checkpoint_that_says_it_is_not_exact(
    cluster: Callable[[int], Cluster],
) -> None:
    c = cluster(2)
    c.record(0, range(1, 6))
    c.record(1, range(1, 5))  # died between its optimizer step 5 and its boundary
    c.die(1)
    result = c.rescue(0, FileSink(c.output_dir), step=5, error=None)
    m = manifest(c.output_dir / "checkpoint-5")
    assert m["failure"]["exact"] is False
    assert (c.output_dir / "checkpoint-5" / "rank-1.state").read_bytes() == b"rank 1 step 4"
    assert "the RNG state of rank(s) 1 is of step 4: a resume will not repeat the run exactly" in result.line


@pytest.mark.parametrize(
    ("setting", "said"),
    [
        ("unable", "nothing saved: no rank still alive can write one alone (sharded)"),
        ("on_error none", "nothing saved (dynamic_checkpoint.on_error is none)"),
        ("no step since start", "no step completed since training started at step 3"),
        ("no copy", "nothing saved: rank 1 left no copy of its RNG state"),
    ],
)
def test_nothing_saved_says_why_and_names_the_newest_complete_checkpoint(
    cluster: Callable[[int], Cluster], setting: str, said: str
) -> None:
    c = cluster(2)
    earlier = RenameCommit(c.output_dir, 2)
    earlier.create()
    earlier.finalize(SaveRecord(step=2, kind="full", reason="schedule", world_size=2), dict, {}, read_back=True)
    c.record(0, range(1, 4))
    if setting != "no copy":
        c.record(1, range(1, 4))
    c.die(1)
    sink = FileSink(c.output_dir, unable="sharded" if setting == "unable" else None)
    result = c.rescue(
        0,
        sink,
        step=3,
        error=None,
        kind=None if setting == "on_error none" else "full",
        start_step=3 if setting == "no step since start" else 0,
    )
    assert said in result.line, result.line
    assert result.line.endswith(f"the newest complete checkpoint is {c.output_dir / 'checkpoint-2'}")
    assert result.outcome is None or isinstance(result.outcome, NotWritten)
    assert sink.rescues == 0 and sorted(p.name for p in c.output_dir.iterdir()) == ["checkpoint-2"]


def test_a_step_already_saved_is_not_written_again(cluster: Callable[[int], Cluster]) -> None:
    c = cluster(2)
    done = RenameCommit(c.output_dir, 3)
    done.create()
    done.finalize(SaveRecord(step=3, kind="full", reason="file", world_size=2), dict, {}, read_back=True)
    c.record(0, range(1, 4))
    c.record(1, range(1, 4))
    c.die(1)
    sink = FileSink(c.output_dir)
    result = c.rescue(0, sink, step=3, error=None)
    assert sink.rescues == 0 and "step 3 was already saved" in result.line


def test_without_shared_memory_nothing_is_saved_and_the_line_says_why(tmp_path: Path) -> None:
    result = rescue(
        None, FileSink(tmp_path), output_dir=tmp_path, step=9, start_step=0, kind="full", error=RuntimeError("x")
    )  # type: ignore[arg-type]
    assert "the ranks share no memory (several machines, or CKPTBUS_VOTES=collective)" in result.line
    assert result.line.endswith(f"{tmp_path} holds no complete checkpoint")


def test_a_record_torn_by_a_death_mid_write_leaves_the_previous_one_whole(cluster: Callable[[int], Cluster]) -> None:
    c = cluster(1)
    mirror = c.mirrors[0]
    mirror.record(4, b"state of 4")
    mirror.record(5, b"state of 5")
    assert mirror.state_of(0, 5) == b"state of 5" and mirror.state_of(0, 4) == b"state of 4"
    # Step 6 goes into the buffer of step 4; a death after its data and before its header leaves the header of 4
    # over data of 6: the CRC refuses it, and step 5 is still whole.
    at = mirror._record_offset(0, 0)
    os.pwrite(c.fds[0], b"state of 6", at + 24)
    assert mirror.state_of(0, 4) is None and mirror.state_of(0, 5) == b"state of 5"
    with pytest.raises(ValueError, match="small state is"):
        mirror.record(7, b"x" * (RECORD_BYTES + 1))


def test_one_process_that_raises_saves_its_last_step_boundary_with_the_rng_state_of_that_boundary(
    tmp_path: Path,
) -> None:
    """``python train.py`` and a one-process loop: the same rescue, with a mirror no one else reads."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from ckptbus.plugins import DynamicCheckpoint

    accelerator = Accelerator(cpu=True)
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model, optimizer = accelerator.prepare(model, optimizer)
        at_boundary: list[torch.Tensor] = []
        with pytest.raises(ValueError, match="loss is NaN"), DynamicCheckpoint(accelerator, tmp_path) as ckpt:
            for step in range(1, 5):
                loss = model(torch.randn(2, 4)).pow(2).mean()  # (draws from the RNG after the last boundary too)
                if step == 4:
                    raise ValueError("loss is NaN")
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
                ckpt.step(step)
                at_boundary.append(torch.get_rng_state())
        info = read_checkpoint(tmp_path / "checkpoint-3")
        assert info.manifest.reason == "error" and info.manifest.failure is not None
        assert info.manifest.failure["ranks"] == [0] and info.manifest.failure["exact"] is True
        rng = torch.load(tmp_path / "checkpoint-3" / "random_states_0.pkl", weights_only=False)
        assert torch.equal(rng["torch_manual_seed"], at_boundary[-1]), "not the RNG state of step 3's boundary"
    finally:
        AcceleratorState._reset_state(True)
        PartialState._reset_state()
