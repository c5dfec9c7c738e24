"""The real sinks in process: AccelerateSink with a one-process Accelerator, TrainerSink with bound fakes.

Each sink is driven the way the runtime drives it (plan, then execute, or
begin and poll, or abandon), without the runtime (tests/test_step_protocol.py
has that). The end-to-end tests run them under ``accelerate launch``.

AccelerateSink on 2 ranks: threads share the one Accelerator, which believes
it is process 0 of 1 on every thread. Two thread ranks writing a save would
both write ``random_states_0.pkl`` into the same staging directory (and under
``save_model`` both would write the weights), so a *successful* save is not
sane across thread ranks. The agreement paths are: a stage that fails on rank
1 before it writes anything. That is what the 2-rank test does; every
successful save here uses a world of one.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from ckptbus.plugins.distributed import Ranks
from ckptbus.plugins.saving import async_writer
from ckptbus.plugins.saving.accelerate_sink import AccelerateSink
from ckptbus.plugins.saving.trainer_sink import TrainerSink
from safetensors.torch import load_file
from thread_ranks import ThreadCollective, run_ranks

from ckptbus import Bus, SaveKind, list_checkpoints, read_checkpoint
from ckptbus._coordinator import Decision
from ckptbus._names import MANIFEST_NAME, STAGING_PREFIX
from ckptbus._sink import NotWritten, Outcome, SaveRecord, Written
from ckptbus._verify import verify_checkpoint


def record(step: int, kind: SaveKind = "full", world_size: int = 1, reason: str = "api") -> SaveRecord:
    """The record of one agreed save, as the runtime hands it to a sink."""
    return SaveRecord(step=step, kind=kind, reason=reason, world_size=world_size)


def leftovers(output_dir: Path) -> list[str]:
    """What an output_dir holds besides complete checkpoints: staging and half-written directories."""
    complete = {c.path.name for c in list_checkpoints(output_dir)}
    return sorted(p.name for p in output_dir.iterdir() if p.name not in complete)


# -- AccelerateSink -------------------------------------------------------------------------------------------------


@dataclass
class Training:
    """A one-process Accelerator on the CPU with a tiny model and AdamW, prepared, and one training step."""

    accelerator: Any
    model: torch.nn.Module
    optimizer: Any

    def step(self) -> None:
        x = torch.randn(4, 8)
        self.accelerator.backward(self.model(x).pow(2).mean())
        self.optimizer.step()
        self.optimizer.zero_grad()

    def parameters(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.model.parameters()]


@pytest.fixture
def training() -> Iterator[Training]:
    """As tests/test_async_save.py does it: accelerate's process-wide state is reset after the test."""
    accelerator = Accelerator(cpu=True)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model, optimizer = accelerator.prepare(model, optimizer)
        run = Training(accelerator, model, optimizer)
        run.step()  # an optimizer state to save
        yield run
    finally:
        AcceleratorState._reset_state(True)
        PartialState._reset_state()


def started(training: Training, output_dir: Path, **kwargs: Any) -> AccelerateSink:
    sink = AccelerateSink(training.accelerator, **kwargs)
    sink.start(Ranks(), output_dir)
    return sink


def no_space(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_save_writes_what_load_state_loads_with_a_manifest_that_verifies(
    training: Training, tmp_path: Path
) -> None:
    sink = started(training, tmp_path)
    decision = Decision(3, "full", False, ("api",), ())
    assert sink.plan(decision) == (decision, "sync")
    outcome = sink.execute(record(3))
    assert outcome == Written(tmp_path / "checkpoint-3", outcome.bytes, outcome.stall_seconds, outcome.write_seconds)
    assert outcome.bytes > 0 and outcome.write_seconds > 0
    info = read_checkpoint(outcome.path)
    names = set(info.manifest.files)
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl"} <= names, names
    assert (info.manifest.step, info.manifest.kind, info.manifest.reason, info.manifest.world_size) == (
        3,
        "full",
        "api",
        1,
    )
    assert set(info.manifest.digests) == names, "a file ckptbus wrote has no digest"
    report = verify_checkpoint(info)
    assert report.ok and report.note is None, report.summary()
    saved = training.parameters()
    training.step()
    assert not all(a.equal(b) for a, b in zip(saved, training.parameters(), strict=True))
    training.accelerator.load_state(str(outcome.path))
    assert all(a.equal(b) for a, b in zip(saved, training.parameters(), strict=True)), "load_state restored nothing"
    assert leftovers(tmp_path) == []


def test_a_weights_save_writes_model_safetensors(training: Training, tmp_path: Path) -> None:
    sink = started(training, tmp_path, async_save=True)
    decision = Decision(2, "weights", False, ("signal",), ())
    assert sink.plan(decision) == (decision, "sync"), "a weights save is never asynchronous"
    outcome = sink.execute(record(2, "weights", reason="signal:SIGINT"))
    assert isinstance(outcome, Written)
    info = read_checkpoint(outcome.path)
    assert (info.manifest.kind, info.manifest.reason) == ("weights", "signal:SIGINT")
    assert "model.safetensors" in info.manifest.files and "optimizer.bin" not in info.manifest.files
    weights = load_file(str(outcome.path / "model.safetensors"))
    state = training.accelerator.unwrap_model(training.model).state_dict()
    assert weights.keys() == state.keys() and all(weights[k].equal(state[k]) for k in state)
    assert verify_checkpoint(info).ok


def test_an_async_save_is_begun_then_polled_and_writes_the_files_a_sync_save_writes(
    training: Training, tmp_path: Path
) -> None:
    sink = started(training, tmp_path, async_save=True)
    decision = Decision(1, "full", False, ("api",), ())
    assert sink.plan(decision) == (decision, "async")
    assert sink.execute(record(1)) == Written(tmp_path / "checkpoint-1", *_figures(tmp_path / "checkpoint-1"))
    assert sink.begin(record(2)) is None
    outcome = sink.poll(wait=True)
    assert isinstance(outcome, Written) and outcome.path == tmp_path / "checkpoint-2"
    assert sink.poll(wait=True) is None, "nothing is in flight once it was settled"
    sync, asynchronous = read_checkpoint(tmp_path / "checkpoint-1"), read_checkpoint(outcome.path)
    assert asynchronous.manifest.files == sync.manifest.files
    # The same state (nothing trained between the two saves): the same bytes, file by file.
    assert asynchronous.manifest.digests == sync.manifest.digests
    assert verify_checkpoint(asynchronous).ok
    training.accelerator.load_state(str(outcome.path))
    assert leftovers(tmp_path) == []


def _figures(path: Path) -> tuple[int, float, float]:
    manifest = read_checkpoint(path).manifest
    return manifest.bytes, manifest.stall_seconds, manifest.write_seconds


def test_an_async_save_keeps_the_state_of_its_step_while_training_goes_on(training: Training, tmp_path: Path) -> None:
    sink = started(training, tmp_path, async_save=True)
    model = training.accelerator.unwrap_model(training.model)
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert sink.begin(record(1)) is None
    training.step()  # optimizer.step() waits for the writer's copies, then changes the parameters
    outcome = sink.poll(wait=True)
    assert isinstance(outcome, Written)
    weights = load_file(str(outcome.path / "model.safetensors"))
    assert weights.keys() == expected.keys()
    assert all(weights[name].equal(value) for name, value in expected.items()), "the file holds a later step"
    assert not all(p.equal(expected[name]) for name, p in model.named_parameters()), "training did not go on"


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_failed_write_is_not_written_and_leaves_neither_checkpoint_nor_staging(
    training: Training, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, async_save: bool
) -> None:
    """The writer's file writes raise ENOSPC (root ignores a read-only directory, so a write is made to fail)."""
    monkeypatch.setattr(async_writer, "save", no_space)
    sink = started(training, tmp_path, async_save=async_save)
    if async_save:
        assert sink.begin(record(4)) is None
        outcome = sink.poll(wait=True)
    else:
        outcome = sink.execute(record(4))
    assert isinstance(outcome, NotWritten)
    assert outcome.error.startswith("writing failed on rank 0: "), outcome.error
    # Said as a full disk, naming where (plugins/saving/errors.py).
    assert f"No space left on device writing {tmp_path / (STAGING_PREFIX + 'checkpoint-4')}" in outcome.error
    assert not (tmp_path / "checkpoint-4").exists()
    assert leftovers(tmp_path) == []


def test_abandon_commits_nothing_and_the_next_start_removes_its_staging(training: Training, tmp_path: Path) -> None:
    sink = started(training, tmp_path, async_save=True)
    assert sink.begin(record(5)) is None
    flight = sink._async
    assert flight is not None
    sink.abandon()
    flight.job.wait()  # the writer is a daemon thread that ends on its own; the leak guard must not see it
    assert sink.poll(wait=True) is None
    assert list_checkpoints(tmp_path) == []
    assert leftovers(tmp_path) == [f"{STAGING_PREFIX}checkpoint-5"]
    started(training, tmp_path)  # a new run's start removes what the abandoned save left
    assert leftovers(tmp_path) == []


def test_a_write_failing_on_one_thread_rank_is_not_written_on_both_with_its_words(
    training: Training, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two thread ranks share the one Accelerator (module docstring): rank 1 fails to create its first file, so
    nothing of it is on disk; rank 0 writes its part. Both report rank 1's error, and the committer removes the
    staging directory."""
    real_file = async_writer.DigestingFile

    def file_failing_on_rank_1(path: Path, **kwargs: Any) -> Any:
        if threading.current_thread().name == "thread-rank-1":
            raise OSError(errno.EIO, "Input/output error (rank 1's disk)")
        return real_file(path, **kwargs)

    monkeypatch.setattr(async_writer, "DigestingFile", file_failing_on_rank_1)

    def body(rank: int, collective: ThreadCollective) -> object:
        sink = AccelerateSink(training.accelerator)
        sink.start(Ranks.of(collective, rank=rank, local_rank=rank, save_on_each_node=False), tmp_path)
        return sink.execute(record(6, world_size=2))

    outcomes = run_ranks(2, body)
    words = "writing failed on rank 1: OSError: [Errno 5] Input/output error (rank 1's disk)"
    assert outcomes == [NotWritten(words), NotWritten(words)]
    assert list(tmp_path.iterdir()) == []


def test_the_sinks_have_no_bus(training: Training, tmp_path: Path) -> None:
    """Only the runtime publishes save outcomes: a sink holds no bus to publish on."""
    for sink in (started(training, tmp_path), TrainerSink()):
        assert not any(isinstance(value, Bus) for value in vars(sink).values()), sink


# -- TrainerSink ----------------------------------------------------------------------------------------------------
# The Trainer's args and control are fakes with the two fields the sink reads and writes; a real Trainer writes
# through this sink in tests/test_hf_trainer.py.


def trainer_sink(output_dir: Path, *, save_only_model: bool = False, should_save: bool = False) -> TrainerSink:
    sink = TrainerSink()
    sink.bind(SimpleNamespace(save_only_model=save_only_model), SimpleNamespace(should_save=should_save))
    sink.start(Ranks(), output_dir)
    return sink


def trainer_writes(output_dir: Path, step: int, names: tuple[str, ...] = ("model.safetensors",)) -> Path:
    """What the Trainer's ``_save_checkpoint`` leaves: ``checkpoint-<step>`` with its files, no manifest."""
    directory = output_dir / f"checkpoint-{step}"
    directory.mkdir(exist_ok=True)
    for name in names:
        (directory / name).write_bytes(name.encode() * 10)
    return directory


@pytest.mark.parametrize(
    ("kind", "trainer_saves", "save_only_model", "planned_kind", "planned_reasons"),
    [
        pytest.param("weights", True, False, "full", ("schedule", "api"), id="the-trainer-saves-anyway"),
        pytest.param("full", True, False, "full", ("schedule", "api"), id="full-on-a-saving-step"),
        pytest.param("weights", False, False, "weights", ("api",), id="weights-alone"),
        pytest.param("full", False, False, "full", ("api",), id="full-alone"),
        pytest.param("full", False, True, "weights", ("api",), id="save-only-model"),
    ],
)
def test_trainer_sink_plans_every_save_deferred_and_reshapes_it_to_what_the_trainer_writes(
    tmp_path: Path,
    kind: SaveKind,
    trainer_saves: bool,
    save_only_model: bool,
    planned_kind: str,
    planned_reasons: tuple[str, ...],
) -> None:
    sink = trainer_sink(tmp_path, save_only_model=save_only_model, should_save=trainer_saves)
    planned, mode = sink.plan(Decision(7, kind, False, ("api",), ()))
    assert (planned.kind, planned.reasons, planned.step, mode) == (planned_kind, planned_reasons, 7, "deferred")
    with pytest.raises(RuntimeError, match="deferred"):
        sink.execute(record(7))


def test_trainer_sink_has_the_trainer_save_weights_once_then_completes_it_with_a_manifest(tmp_path: Path) -> None:
    sink = trainer_sink(tmp_path)
    old = trainer_writes(tmp_path, 8)
    (old / MANIFEST_NAME).write_text("{}")  # a manifest of an earlier save of this step must not vouch for new files
    crc_before = torch.serialization.get_crc32_options()
    assert sink.begin(record(8, "weights")) is None
    assert not (old / MANIFEST_NAME).exists()
    assert (sink.args.save_only_model, sink.control.should_save) == (True, True)
    assert torch.serialization.get_crc32_options() is False, "the Trainer's torch.save runs without CRC32s"
    assert sink.poll(wait=False) is None, "the Trainer has not saved yet"
    trainer_writes(tmp_path, 8, ("model.safetensors", "rng_state.pth"))
    outcome = sink.poll(wait=True)
    assert isinstance(outcome, Written) and outcome.path == tmp_path / "checkpoint-8"
    assert sink.args.save_only_model is False, "save_only_model was not put back after the save"
    assert torch.serialization.get_crc32_options() is crc_before
    info = read_checkpoint(outcome.path)
    assert (info.manifest.kind, info.manifest.step, info.manifest.world_size) == ("weights", 8, 1)
    assert set(info.manifest.files) == {"model.safetensors", "rng_state.pth"}
    assert verify_checkpoint(info).ok
    assert outcome.bytes == info.manifest.bytes


def test_trainer_sink_abandon_puts_save_only_model_back(tmp_path: Path) -> None:
    sink = trainer_sink(tmp_path)
    assert sink.begin(record(9, "weights")) is None
    assert sink.args.save_only_model is True
    sink.abandon()
    assert sink.args.save_only_model is False
    assert sink.poll(wait=True) is None, "an abandoned save is forgotten"
    assert list_checkpoints(tmp_path) == []


def test_trainer_sink_keeps_a_user_save_only_model(tmp_path: Path) -> None:
    sink = trainer_sink(tmp_path, save_only_model=True)
    assert sink.begin(record(3, "weights")) is None
    trainer_writes(tmp_path, 3)
    assert isinstance(sink.poll(wait=True), Written)
    assert sink.args.save_only_model is True, "the user's own save_only_model was switched off"


def test_trainer_sink_reports_a_checkpoint_the_trainer_did_not_write_as_not_written(tmp_path: Path) -> None:
    sink = trainer_sink(tmp_path)
    assert sink.begin(record(10)) is None
    outcome = sink.poll(wait=True)
    assert outcome == NotWritten(
        f"writing failed on rank 0: CheckpointError: the Trainer did not write {tmp_path / 'checkpoint-10'}"
    )
    assert list(tmp_path.iterdir()) == []


def test_trainer_sink_on_two_thread_ranks_agrees_on_the_outcome(tmp_path: Path) -> None:
    """Every rank's Trainer saved (rank 1 writes its own RNG state file); the committer writes the manifest."""

    def body(rank: int, collective: ThreadCollective) -> tuple[Outcome | None, Outcome | None]:
        sink = TrainerSink()
        sink.bind(SimpleNamespace(save_only_model=False), SimpleNamespace(should_save=False))
        sink.start(Ranks.of(collective, rank=rank, local_rank=rank, save_on_each_node=False), tmp_path)
        assert sink.begin(record(12, world_size=2)) is None
        trainer_writes(tmp_path, 12, (f"rng_state_{rank}.pth",) + (("model.safetensors",) if rank == 0 else ()))
        written = sink.poll(wait=True)
        assert sink.begin(record(13, world_size=2)) is None  # the Trainer does not save step 13
        return written, sink.poll(wait=True)

    (w0, missing0), (w1, missing1) = run_ranks(2, body)
    assert isinstance(w0, Written) and w0.path == tmp_path / "checkpoint-12" and w0.bytes > 0
    assert w1 == Written(tmp_path / "checkpoint-12"), "the figures are the committer's (the runtime shares them)"
    info = read_checkpoint(tmp_path / "checkpoint-12")
    assert set(info.manifest.files) == {"model.safetensors", "rng_state_0.pth", "rng_state_1.pth"}
    assert (info.manifest.world_size, info.manifest.bytes) == (2, w0.bytes)
    words = f"writing failed on rank 0: CheckpointError: the Trainer did not write {tmp_path / 'checkpoint-13'}"
    assert missing0 == missing1 == NotWritten(words)


# -- AccelerateSink after a failure (plugins/rescue.py decides when; tests/test_crash_rescue.py end to end) ---------


def test_a_rescue_writes_every_ranks_rng_state_given_and_load_state_restores_this_ranks(
    training: Training, tmp_path: Path
) -> None:
    sink = started(training, tmp_path)
    torch.manual_seed(7)
    mine = sink.rank_state()
    torch.manual_seed(8)
    other = sink.rank_state()  # (what rank 1 copied at the same boundary, say)
    expected = torch.get_rng_state()
    torch.manual_seed(7)
    expected_rank0 = torch.get_rng_state()
    saved = training.parameters()
    outcome = sink.rescue(record(5, world_size=2, reason="rank_failure"), {0: mine, 1: other})
    assert isinstance(outcome, Written) and outcome.path == tmp_path / "checkpoint-5"
    info = read_checkpoint(outcome.path)
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl"} <= set(
        info.manifest.files
    )
    assert verify_checkpoint(info).ok
    rank1 = torch.load(outcome.path / "random_states_1.pkl", weights_only=False)
    assert torch.equal(rank1["torch_manual_seed"], expected), "rank 1's state is the copy it gave, not this rank's"
    training.step()
    torch.manual_seed(99)
    training.accelerator.load_state(str(outcome.path))
    assert all(a.equal(b) for a, b in zip(saved, training.parameters(), strict=True))
    assert torch.equal(torch.get_rng_state(), expected_rank0), "load_state did not restore rank 0's RNG state"
    assert leftovers(tmp_path) == []


def test_a_weights_rescue_writes_model_safetensors_from_any_rank(training: Training, tmp_path: Path) -> None:
    sink = started(training, tmp_path)
    outcome = sink.rescue(record(6, "weights", reason="error"), {0: sink.rank_state()})
    assert isinstance(outcome, Written)
    weights = load_file(str(outcome.path / "model.safetensors"))
    state = training.accelerator.unwrap_model(training.model).state_dict()
    assert weights.keys() == state.keys() and all(weights[k].equal(state[k]) for k in state)


def test_a_rank_between_its_optimizer_step_and_its_boundary_cannot_rescue(training: Training, tmp_path: Path) -> None:
    sink = started(training, tmp_path)
    sink.rank_state()  # a step boundary
    assert sink.rescue_unsupported() is None
    training.step()  # the optimizer stepped; the boundary of that step has not come
    assert "after an optimizer step and before the step boundary" in (sink.rescue_unsupported() or "")
    sink.rank_state()
    assert sink.rescue_unsupported() is None
