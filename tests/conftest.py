"""Fixtures shared by the tests: real training runs, killed with their process tree at teardown."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from launch import TrainingRun


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., TrainingRun]]:
    """``launch(processes=2, config={...})`` starts a training run; all are killed at teardown."""
    runs: list[TrainingRun] = []

    def start(**kwargs: Any) -> TrainingRun:
        kwargs.setdefault("name", f"run{len(runs)}")
        run = TrainingRun(tmp_path, **kwargs).start()
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.kill()


@pytest.fixture(autouse=True)
def _ckptbus_logs_propagate(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ckptbus")
