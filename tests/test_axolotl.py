"""The axolotl plugin (``ckptbus.plugins.axolotl.CkptbusPlugin``) with real axolotl on CPU.

axolotl is large (about 4 GB with its requirements), so it lives in its own
virtualenv, ``.venv-axolotl`` (``make test-axolotl`` sets it up and runs
this file there); in an interpreter that cannot import it these tests are
skipped, saying so.

Nothing is downloaded: a tiny Llama (a config with random weights) and a
word-level tokenizer built with ``tokenizers`` are saved to a temporary
directory, with a jsonl dataset of ``type: completion``.

- The config tests load YAML files with axolotl's own ``load_cfg`` (the
  plugin registered and axolotl's schema applied, as in a run) and read them
  with the plugin.
- The end-to-end test runs ``python -m axolotl.cli.train`` (1 rank) and
  ``accelerate launch --multi_gpu --num_processes 2 -m axolotl.cli.train``
  (2 ranks over gloo): the trigger file, ``ckptbus request`` over the socket,
  Ctrl+C to the launcher's process group, then a second run that resumes
  from ``latest``. 2 CPU ranks need the test-only shim
  ``tests/axolotl/cpu_ranks.py`` (axolotl puts rank r's model on GPU r).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from runs import BIN, REPO, TrainingRun, accelerate_launch, read_jsonl

from ckptbus import CheckpointInfo, ConfigError, list_checkpoints, read_checkpoint

# A submodule, not "axolotl": tests/axolotl/ (the shim's folder, on the path as a namespace package) would satisfy
# a bare "import axolotl" where the real one is missing.
pytest.importorskip(
    "axolotl.integrations.base",
    reason="axolotl is not importable in this interpreter; `make test-axolotl` runs these tests in .venv-axolotl",
)

pytestmark = pytest.mark.axolotl

# axolotl's usage telemetry is on unless opted out; it would post from a thread of its own (a leak here, and no
# network to reach). The runs below inherit this.
NO_TELEMETRY = {"AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1", "WANDB_MODE": "disabled"}
os.environ.update(NO_TELEMETRY)

PLUGIN = "ckptbus.plugins.axolotl.CkptbusPlugin"
SHIM_DIR = Path(__file__).parent / "axolotl"
TRIGGER = "axolotl_checkpoint.save"
WORDS = [f"w{i}" for i in range(20)]  # a word-level vocabulary: any words do


@dataclass(frozen=True)
class Assets:
    model: Path
    data: Path
    prepared: Path


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    """A tiny Llama with random weights, its tokenizer (built here) and a jsonl dataset: nothing downloaded."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("axolotl-assets")
    generator = torch.Generator().manual_seed(0)
    rows = [
        " ".join(WORDS[i] for i in torch.randint(len(WORDS), (24,), generator=generator).tolist()) for _ in range(512)
    ]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows), encoding="utf-8")

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(rows, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>", "<pad>"]))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    model_dir = root / "model"
    fast.save_pretrained(model_dir)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    return Assets(model=model_dir, data=data, prepared=root / "prepared")


def axolotl_config(assets: Assets, output_dir: Path, **keys: Any) -> dict[str, Any]:
    """An axolotl config for the tiny model, with the plugin; ``keys`` added or replacing (None removes)."""
    config: dict[str, Any] = {
        "base_model": str(assets.model),
        "plugins": [PLUGIN, "cpu_ranks.CpuRanks"],
        "datasets": [{"path": str(assets.data), "ds_type": "json", "type": "completion"}],
        "dataset_prepared_path": str(assets.prepared),
        "val_set_size": 0,
        "sequence_len": 32,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "num_epochs": 1000,
        "max_steps": 100000,
        "learning_rate": 0.001,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "output_dir": str(output_dir),
        "save_strategy": "no",
        "logging_steps": 1,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "special_tokens": {"pad_token": "<pad>"},
        "dynamic_checkpoint": {"enabled": True, "check_interval": 2},
    }
    config.update(keys)
    return {k: v for k, v in config.items() if v is not None}


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


# -- the config, as axolotl loads it (no training) -----------------------------------


def load(path: Path) -> tuple[Any, Any]:
    """axolotl's ``load_cfg`` of ``path`` (the plugins registered, the schema applied), and the ckptbus plugin."""
    from axolotl.cli.config import load_cfg
    from axolotl.integrations.base import PluginManager

    cfg = load_cfg(str(path))
    return cfg, PluginManager.get_instance().plugins[PLUGIN]


def ckptbus_config(tmp_path: Path, assets: Assets, **keys: Any) -> Any:
    from ckptbus.plugins.axolotl import config_from_axolotl

    cfg, plugin = load(write_config(tmp_path / "axolotl.yaml", axolotl_config(assets, tmp_path / "out", **keys)))
    return config_from_axolotl(cfg, plugin.extra)


def test_the_block_has_axolotls_defaults(tmp_path: Path, assets: Assets) -> None:
    config = ckptbus_config(tmp_path, assets, dynamic_checkpoint={"enabled": True})
    dyn = config.dynamic_checkpoint
    # axolotl's schema fills in 10 (its docs say 100) and its callback takes an empty file name as this one.
    assert (dyn.enabled, dyn.check_interval, dyn.trigger_file_path) == (True, 10, TRIGGER)
    assert config.output_dir == str(tmp_path / "out")
    assert (dyn.signals.sigint, dyn.socket.enabled) == ("weights_exit", True)  # ckptbus's own defaults


@pytest.mark.parametrize(
    "block", [None, {"enabled": False}, {"check_interval": 5}], ids=["null", "disabled", "no-enabled"]
)
def test_off_in_axolotl_is_off(tmp_path: Path, assets: Assets, block: Any) -> None:
    # `dynamic_checkpoint: null` is written out, as a user would; axolotl reads it as off.
    config = axolotl_config(assets, tmp_path / "out")
    config["dynamic_checkpoint"] = block
    from ckptbus.plugins.axolotl import config_from_axolotl

    cfg, plugin = load(write_config(tmp_path / "axolotl.yaml", config))
    assert config_from_axolotl(cfg, plugin.extra) is None
    assert plugin.add_callbacks_pre_trainer(cfg, None) == []


def test_the_ckptbus_block_sets_ckptbus_keys(tmp_path: Path, assets: Assets) -> None:
    block = {"signals": {"sigint": "full_exit"}, "socket": {"timeout": 3}, "verify": "sizes"}
    config = ckptbus_config(tmp_path, assets, ckptbus=block, dynamic_checkpoint={"enabled": True, "check_interval": 7})
    dyn = config.dynamic_checkpoint
    assert (dyn.check_interval, dyn.signals.sigint, dyn.socket.timeout, dyn.verify) == (7, "full_exit", 3.0, "sizes")


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"signal": {"sigint": "none"}}, r"unknown config key 'ckptbus\.signal'; did you mean 'ckptbus\.signals'\?"),
        ({"check_interval": 5}, r"'ckptbus\.check_interval' is axolotl's: write it under dynamic_checkpoint"),
        ({"signals": {"sigint": "save"}}, r"config key 'ckptbus\.signals\.sigint': got 'save'"),
    ],
)
def test_a_bad_ckptbus_block_is_refused_when_the_plugin_registers(
    tmp_path: Path, assets: Assets, block: dict[str, Any], message: str
) -> None:
    path = write_config(tmp_path / "axolotl.yaml", axolotl_config(assets, tmp_path / "out", ckptbus=block))
    with pytest.raises(ConfigError, match=message):
        load(path)


def test_a_trigger_path_ckptbus_cannot_serve_is_refused_before_training(tmp_path: Path, assets: Assets) -> None:
    with pytest.raises(ConfigError, match=r"'dynamic_checkpoint\.trigger_file_path': got 'sub/dir\.save'"):
        ckptbus_config(tmp_path, assets, dynamic_checkpoint={"enabled": True, "trigger_file_path": "sub/dir.save"})


# -- real runs: 1 rank and 2 ranks -----------------------------------------------------


def launch_command(processes: int, config_path: Path) -> list[str]:
    """What `axolotl train` runs: the module under accelerate (2 ranks), or plainly under Python (1 rank, so that
    Ctrl+C to its process group reaches the rank itself and its exit status is the test's to read)."""
    if processes == 1:
        return [sys.executable, "-m", "axolotl.cli.train", str(config_path)]
    return accelerate_launch("-m", "axolotl.cli.train", str(config_path), processes=processes)


@pytest.fixture
def axolotl_run(tmp_path: Path, assets: Assets) -> Iterator[Callable[..., TrainingRun]]:
    """``axolotl_run(processes, **keys)``: a real axolotl run of the tiny model; every run is killed at teardown."""
    runs: list[TrainingRun] = []
    env = {
        "PYTHONPATH": os.pathsep.join([str(SHIM_DIR), os.environ.get("PYTHONPATH", "")]),
        "ACCELERATE_USE_CPU": "1",  # the Trainer's view: every rank over gloo on a machine without a GPU
        **NO_TELEMETRY,
    }

    def start(processes: int, **keys: Any) -> TrainingRun:
        config = axolotl_config(assets, tmp_path / "out", **keys)
        run = TrainingRun(tmp_path, name=f"axolotl{len(runs)}", config=config, raw_config=True, env=env)
        runs.append(run.start(launch_command(processes, run.config_path)))
        return run

    yield start
    for run in runs:
        run.kill()


def wait_for_checkpoint(run: TrainingRun, reason: str, timeout: float = 600) -> CheckpointInfo:
    def found() -> list[CheckpointInfo]:
        return [c for c in list_checkpoints(run.output_dir) if c.manifest.reason == reason]

    return run.wait_for(found, f"a checkpoint with reason {reason!r}", timeout=timeout, interval=0.2)[0]


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("processes", [1, 2], ids=["1-rank", "2-ranks"])
def test_trigger_request_ctrl_c_then_resume(processes: int, axolotl_run: Callable[..., TrainingRun]) -> None:
    run = axolotl_run(processes)
    out = run.output_dir
    # axolotl takes minutes to import on 2 busy cores; the socket is there once training began.
    run.wait_for(lambda: (out / "ckptbus.sock").exists(), "the ckptbus socket", timeout=900, interval=0.5)

    # The trigger file: one full checkpoint, written by the Trainer, with ckptbus's manifest; the file is gone.
    (out / TRIGGER).touch()
    by_file = wait_for_checkpoint(run, "file")
    assert (by_file.manifest.kind, by_file.manifest.world_size) == ("full", processes)
    names = {p.name for p in by_file.path.iterdir()}
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= names, names
    rng_states = {"rng_state.pth"} if processes == 1 else {f"rng_state_{r}.pth" for r in range(processes)}
    assert rng_states <= names, names  # every rank's part is in before the manifest
    assert not (out / TRIGGER).exists()

    # `ckptbus request` over the socket: the path, once every rank's part and the manifest are written.
    request = subprocess.run(
        [str(BIN / "ckptbus"), "request", "--output-dir", str(out), "--label", "from the test", "--timeout", "300"],
        capture_output=True,
        text=True,
        timeout=360,
    )
    assert request.returncode == 0, request.stderr + run.log_tail()
    by_socket = read_checkpoint(request.stdout.strip())
    assert (by_socket.manifest.kind, by_socket.manifest.reason, by_socket.manifest.labels) == (
        "full",
        "socket",
        ["from the test"],
    )
    assert by_socket.step > by_file.step
    # One save for the touch: axolotl's own watcher of the same file was taken off and never fired.
    assert [c.step for c in list_checkpoints(out)] == [by_file.step, by_socket.step]
    assert "axolotl's own watcher is removed" in run.log()
    assert "Dynamic checkpoint triggered via file" not in run.log()

    # Ctrl+C in the terminal: every rank stops at one step and saves the weights; axolotl writes nothing more.
    os.killpg(run.pid, signal.SIGINT)
    code = run.wait_exit(timeout=300)
    # One rank: its own status (128 + SIGINT). Two: torchrun's, which re-raises the signal it got.
    assert code == (130 if processes == 1 else 1), run.log_tail()
    by_signal = list_checkpoints(out)[-1]
    assert (by_signal.manifest.kind, by_signal.manifest.reason) == ("weights", "signal:SIGINT")
    names = {p.name for p in by_signal.path.iterdir()}
    assert {"model.safetensors", "config.json"} <= names and "optimizer.pt" not in names, names
    assert not (out / "model.safetensors").exists(), "axolotl saved a second copy of the weights into output_dir"
    log = run.log()
    assert "Ctrl+C is handled by ckptbus" in log, run.log_tail()
    assert "exiting with status 130 without axolotl's final save" in log, run.log_tail()
    assert "KeyboardInterrupt" not in log, run.log_tail()
    completed = [e for e in read_jsonl(out / "ckptbus-events.jsonl") if e["event"] == "SaveCompleted"]
    assert [(e["step"], e["reasons"]) for e in completed] == [
        (by_file.step, ["file"]),
        (by_socket.step, ["socket"]),
        (by_signal.step, ["signal"]),
    ]
    assert not (out / "ckptbus.sock").exists()

    # Resume from `latest`: the newest complete full checkpoint (the socket's), not the newer weights one. The
    # Trainer's own save at the end gets a ckptbus manifest too; its log history goes on from that step.
    step = by_socket.step
    resumed = axolotl_run(
        processes, max_steps=step + 2, resume_from_checkpoint="latest", save_strategy=None, save_steps=1000
    )
    assert resumed.wait_exit(timeout=900) == 0, resumed.log_tail()
    assert f"resuming from {by_socket.path} (step {step})" in resumed.log(), resumed.log_tail()
    (last,) = [c for c in list_checkpoints(out) if c.manifest.reason == "schedule"]
    assert (last.step, last.manifest.kind, last.manifest.world_size) == (step + 2, "full", processes)
    history = json.loads((last.path / "trainer_state.json").read_text(encoding="utf-8"))["log_history"]
    assert [e["step"] for e in history if "loss" in e] == list(range(1, step + 3))  # logging_steps: 1
    assert (out / "model.safetensors").exists()  # a run that ends on its own: axolotl's final save as usual


def test_the_plugin_module_imports_where_axolotl_does() -> None:
    # What `plugins:` names resolves through axolotl's own loader (the short path re-exports the adapter).
    from axolotl.integrations.base import load_plugin
    from ckptbus.plugins.integrations.axolotl import CkptbusPlugin

    assert type(load_plugin(PLUGIN)) is CkptbusPlugin
    assert (REPO / "plugins" / "axolotl.py").exists()
