"""Every configuration key is documented in docs/configuration.md, and nothing documented is unknown."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from ckptbus import CheckpointConfig

REPO = Path(__file__).resolve().parent.parent
DOC = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")


def dotted_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys.extend(dotted_keys(typing.cast(type, tp), f"{prefix}{f.name}."))
        else:
            keys.append(prefix + f.name)
    return keys


def documented_keys() -> set[str]:
    """Keys in the first column of the reference tables."""
    return set(re.findall(r"^\| `([a-z_.0-9]+)` \|", DOC, flags=re.MULTILINE))


def test_every_ckptbus_key_is_documented() -> None:
    missing = [k for k in dotted_keys(CheckpointConfig) if k not in documented_keys()]
    assert missing == [], f"document these keys in docs/configuration.md: {missing}"


@pytest.mark.slow  # importing train.py imports torch
def test_every_train_key_is_documented_and_nothing_else() -> None:
    from train import TrainConfig

    known = set(dotted_keys(CheckpointConfig)) | set(dotted_keys(TrainConfig))
    assert [k for k in dotted_keys(TrainConfig) if k not in documented_keys()] == []
    assert sorted(documented_keys() - known) == [], "docs/configuration.md documents keys that do not exist"
