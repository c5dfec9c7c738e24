"""ckptbus writes its ``torch.save`` files without zip CRC32s unless asked, and they load all the same.

In one process (real Accelerator, real files): a synchronous and an
asynchronous full save with the default and with
``dynamic_checkpoint.torch_save_crc32: true``. ``zipfile`` checks the CRC32s
the way ``unzip -t`` does.
"""

from __future__ import annotations

import copy
import zipfile
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow  # torch


def bad_crc_records(path: Path) -> list[str]:
    """Records of the zip ``path`` whose stored CRC32 does not match their bytes."""
    bad = []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            try:
                with archive.open(info) as fh:
                    while fh.read(1 << 20):
                        pass
            except zipfile.BadZipFile:
                bad.append(info.filename)
    return bad


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("crc32", [False, True], ids=["default", "crc32"])
def test_torch_save_files_carry_crc32s_only_when_asked_and_load_either_way(
    tmp_path: Path, async_save: bool, crc32: bool
) -> None:
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from ckptbus.plugins import DynamicCheckpoint
    from transformers import GPT2Config, GPT2LMHeadModel

    from ckptbus import CheckpointConfig, SaveCompleted
    from ckptbus._config import build

    accelerator = Accelerator(cpu=True)
    try:
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=32, n_positions=16))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model, optimizer = accelerator.prepare(model, optimizer)
        block: dict[str, Any] = {"enabled": False, "check_interval": 1, "async_save": async_save}
        if crc32:
            block["torch_save_crc32"] = True
        config = build(CheckpointConfig, {"output_dir": str(tmp_path), "dynamic_checkpoint": block})
        done: list[SaveCompleted] = []
        step = 0
        states: dict[int, Any] = {}  # the optimizer state after each step (an async save commits steps later)
        with DynamicCheckpoint(accelerator, config) as ckpt:
            ckpt.bus.subscribe("save_completed", done.append)
            ckpt.request("full")
            while not done:
                ids = torch.randint(0, 32, (2, 8))
                accelerator.backward(model(input_ids=ids, labels=ids).loss)
                optimizer.step()
                optimizer.zero_grad()
                step += 1
                states[step] = copy.deepcopy(optimizer.state_dict())
                ckpt.step(step)
                assert step < 50, "the save never completed"
            expected = states[done[0].step]
        assert torch.serialization.get_crc32_options() is True, "the process-wide setting was not put back"
        path = Path(done[0].path)
        bad = bad_crc_records(path / "optimizer.bin")
        if crc32:
            assert bad == []
        else:
            assert any(name.endswith("/data.pkl") or "/data/" in name for name in bad), bad
        loaded = torch.load(path / "optimizer.bin", weights_only=True)
        assert loaded["state"].keys() == expected["state"].keys()
        for key, state in expected["state"].items():
            assert torch.equal(loaded["state"][key]["exp_avg"], state["exp_avg"]), key
        accelerator.load_state(str(path))  # resumes from it as from any checkpoint
    finally:
        AcceleratorState._reset_state(True)
        PartialState._reset_state()
