"""The Trainer sink: ``transformers.Trainer`` writes the checkpoint itself; ckptbus asks for it and completes it.

Every save is ``deferred`` (ckptbus/_sink.py): the Trainer writes after the
step boundary where the ranks agreed, in place, into
``<output_dir>/checkpoint-<step>`` (:class:`~ckptbus._commit.InPlaceCommit`).

- :meth:`TrainerSink.plan`: a step the Trainer saves anyway (its own
  ``save_strategy``) keeps its full checkpoint and is recorded as
  scheduled too; a weights request alone saves the model only (the
  Trainer's ``save_only_model`` for that one save); ``save_only_model``
  set by the user makes every save a weights one.
- :meth:`TrainerSink.begin` (at ``on_step_end``): the committer removes an
  older manifest of this step, the save's settings are switched
  (``save_only_model``, torch.save's CRC32s: saving/torch_save_crc.py), and
  ``control.should_save`` asks the Trainer to save right after.
- :meth:`TrainerSink.poll` with ``wait`` (at ``on_save``, every rank, after
  the Trainer wrote its part): the settings are put back; one collective
  makes sure every rank finished (each writes its own RNG state); the
  committer (``args.should_save``, the same rule as ``Ranks.committer``)
  fsyncs the files and writes the manifest last; a second collective agrees
  on the outcome.

The Trainer writes in place, so ``checkpoint-<step>`` exists while it is
written; only the manifest, written last, makes it complete for resume,
``ckptbus list`` and rotation (the Trainer's own ``resume_from_checkpoint=True``
takes the newest folder, complete or not).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckptbus import CheckpointError
from ckptbus._commit import InPlaceCommit
from ckptbus._coordinator import Decision
from ckptbus._sink import NotWritten, Outcome, SaveMode, SaveRecord, Written

from ..distributed import Ranks, StageFailed
from .torch_save_crc import torch_save_crc32


@dataclasses.dataclass(slots=True)
class _Asked:
    """The save the Trainer was asked for and has not written yet."""

    record: SaveRecord
    commit: InPlaceCommit
    started: float


class TrainerSink:
    """Has the Trainer write agreed saves, and completes them (a :class:`~ckptbus._sink.Sink`). See the module
    docstring. The adapter binds the Trainer's ``args`` and ``control`` before the first step boundary."""

    def __init__(self, *, torch_save_crc32: bool = False) -> None:
        self.torch_save_crc32 = torch_save_crc32
        self.args: Any = None
        self.control: Any = None
        self.ranks = Ranks()
        self.output_dir = Path(".")
        self._asked: _Asked | None = None
        self._settings = contextlib.ExitStack()  # what a save switched until the Trainer saved

    def bind(self, args: Any, control: Any) -> None:
        """The Trainer's ``TrainingArguments`` and ``TrainerControl`` (the objects its callbacks receive)."""
        self.args, self.control = args, control

    def start(self, ranks: Ranks, output_dir: Path) -> None:
        self.ranks, self.output_dir = ranks, output_dir

    def plan(self, decision: Decision) -> tuple[Decision, SaveMode]:
        trainer_saves = bool(self.control is not None and self.control.should_save)
        save_only_model = bool(self.args is not None and self.args.save_only_model)
        reasons = decision.reasons
        if trainer_saves and "schedule" not in reasons:
            reasons = ("schedule", *reasons)
        weights = save_only_model or (decision.kind == "weights" and not trainer_saves)
        return dataclasses.replace(decision, kind="weights" if weights else "full", reasons=reasons), "deferred"

    def execute(self, record: SaveRecord) -> Outcome:
        raise RuntimeError("the Trainer writes its own checkpoints: every save through TrainerSink is deferred")

    def begin(self, record: SaveRecord) -> NotWritten | None:
        commit = InPlaceCommit(self.output_dir, record.step)
        if self.ranks.committer:
            commit.create()  # the Trainer rewrites in place: an old manifest must not call the new files complete
        if record.kind == "weights" and not self.args.save_only_model:
            self.args.save_only_model = True
            self._settings.callback(setattr, self.args, "save_only_model", False)
        # The Trainer's torch.save files of this save as the accelerate sink writes them (saving/torch_save_crc.py).
        self._settings.enter_context(torch_save_crc32(self.torch_save_crc32))
        self._asked = _Asked(record, commit, time.perf_counter())
        self.control.should_save = True
        return None

    def poll(self, *, wait: bool) -> Outcome | None:
        """With ``wait`` (the Trainer saved: ``on_save``): agree, write the manifest last, agree. Else None."""
        asked = self._asked
        if asked is None or not wait:
            return None
        self.abandon()  # (puts the settings back; the save itself goes on below)
        final = asked.commit.final

        def check() -> None:
            if self.ranks.committer and not final.is_dir():
                raise CheckpointError(f"the Trainer did not write {final}")

        def finalize() -> Written:
            if not self.ranks.committer:
                return Written(final)
            elapsed = round(time.perf_counter() - asked.started, 3)
            # The Trainer saved synchronously: training was held for the whole save.
            times = {"seconds": elapsed, "stall_seconds": elapsed, "write_seconds": elapsed}
            manifest = asked.commit.finalize(asked.record, lambda: times, {}, read_back=True)
            return Written(final, manifest.bytes, elapsed, elapsed)

        try:
            self.ranks.agree("writing", check)
            return self.ranks.agree("committing", finalize)
        except StageFailed as failure:
            if self.ranks.committer:
                asked.commit.discard()
            return NotWritten(str(failure))

    def abandon(self) -> None:
        """Forget the save asked for (no collective); the settings it switched are put back."""
        self._asked = None
        self._settings.close()

    # -- a rank failed: the Trainer writes its own checkpoints, on every rank --------------------------------

    def rank_state(self) -> bytes:
        return b""

    def rescue_unsupported(self) -> str | None:
        return "the Trainer writes its checkpoints itself, on every rank, so the ranks still alive cannot write one"

    def rescue(self, record: SaveRecord, rank_states: Mapping[int, bytes]) -> Outcome:
        raise NotImplementedError(self.rescue_unsupported())
