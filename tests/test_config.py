"""Configuration: every bad key, type and value fails at start-up with a message that names it."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from runs import REPO

from ckptbus import CheckpointConfig, ConfigError, DynamicCheckpointConfig, load_config

# Every key a block allows, in the order the message lists them.
TOP_KEYS = ", ".join(sorted(f.name for f in dataclasses.fields(CheckpointConfig)))
DYN_KEYS = ", ".join(sorted(f.name for f in dataclasses.fields(DynamicCheckpointConfig)))
TRIGGER_PATH = (
    "a file name inside output_dir (no '/', not '..') or an absolute path of a file, "
    "for example 'axolotl_checkpoint.save'"
)


@dataclasses.dataclass(kw_only=True, slots=True)
class ScriptKeys:
    """Keys a training script adds beside ckptbus's own (as train.py does)."""

    max_steps: int = 10
    learning_rate: float = 1e-3


def write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


def config_error(tmp_path: Path, data: Any, *extra: type) -> str:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path, *extra)
    message = str(info.value)
    assert message.startswith(f"{path}: "), "the message names the file"
    return message[len(f"{path}: ") :]


# -- what works ---------------------------------------------------------------


def test_defaults_of_the_seed(tmp_path: Path) -> None:
    (cfg,) = load_config(write(tmp_path, {"output_dir": "out"}))
    assert cfg == CheckpointConfig(output_dir="out")
    assert (cfg.save_steps, cfg.save_total_limit, cfg.resume_from_checkpoint) == (None, None, None)
    dyn = cfg.dynamic_checkpoint
    assert (dyn.enabled, dyn.check_interval, dyn.trigger_file_path, dyn.event_log) == (
        False,
        100,
        "axolotl_checkpoint.save",
        True,
    )


def test_the_seed_example_and_script_keys(tmp_path: Path) -> None:
    cfg, script = load_config(REPO / "configs" / "example.yaml", ScriptKeys)
    assert cfg.output_dir == "outputs/example"
    assert cfg.save_steps == 500
    assert cfg.dynamic_checkpoint == DynamicCheckpointConfig(
        enabled=True, check_interval=50, trigger_file_path="axolotl_checkpoint.save"
    )
    assert script == ScriptKeys(max_steps=2000)


@pytest.mark.slow  # imports train.py, hence torch and transformers
def test_every_shipped_config_loads_with_train_py_keys() -> None:
    from train import TrainConfig

    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg, train = load_config(path, TrainConfig)
        assert cfg.dynamic_checkpoint.enabled, path
        assert train.max_steps >= 1, path


@pytest.mark.parametrize("block", ["dynamic_checkpoint: null\n", "dynamic_checkpoint:\n", "dynamic_checkpoint: ~\n"])
def test_a_null_dynamic_checkpoint_block_is_off_as_axolotl_reads_it(tmp_path: Path, block: str) -> None:
    (cfg,) = load_config(write(tmp_path, f"output_dir: o\nsave_steps: 5\n{block}"))
    assert cfg == CheckpointConfig(output_dir="o", save_steps=5)
    assert cfg.dynamic_checkpoint.enabled is False


def test_a_null_block_inside_dynamic_checkpoint_is_still_an_error(tmp_path: Path) -> None:
    # null there would read as "off", and socket's default is on: say so rather than guess.
    message = config_error(tmp_path, {"output_dir": "o", "dynamic_checkpoint": {"socket": None}})
    assert message == "config key 'dynamic_checkpoint.socket': got None (NoneType), expected a mapping"


def test_custom_trigger_name_and_nulls(tmp_path: Path) -> None:
    (cfg,) = load_config(
        write(
            tmp_path,
            {
                "output_dir": "out",
                "save_steps": None,
                "resume_from_checkpoint": "latest",
                "dynamic_checkpoint": {"enabled": True, "check_interval": 1, "trigger_file_path": "save.now"},
            },
        )
    )
    assert cfg.dynamic_checkpoint.trigger_file_path == "save.now"
    assert cfg.resume_from_checkpoint == "latest"


def test_float_keys_accept_whole_numbers(tmp_path: Path) -> None:
    _, script = load_config(write(tmp_path, {"output_dir": "o", "learning_rate": 1}), ScriptKeys)
    assert script.learning_rate == 1.0 and isinstance(script.learning_rate, float)


# -- unknown keys ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"output_dir": "o", "save_step": 5},
            f"unknown config key 'save_step'; did you mean 'save_steps'? Allowed keys: {TOP_KEYS}",
        ),
        (
            {"output_dir": "o", "dynamic_checkpoint": {"check_intervall": 5}},
            "unknown config key 'dynamic_checkpoint.check_intervall'; did you mean "
            f"'dynamic_checkpoint.check_interval'? Allowed keys under dynamic_checkpoint: {DYN_KEYS}",
        ),
        (
            {"output_dir": "o", "dynamic_checkpoint": {"trigger_file": "x"}},
            "unknown config key 'dynamic_checkpoint.trigger_file'; did you mean "
            f"'dynamic_checkpoint.trigger_file_path'? Allowed keys under dynamic_checkpoint: {DYN_KEYS}",
        ),
        (
            # A key of the block written at the top (as some configs of other tools do).
            {"output_dir": "o", "check_interval": 5},
            "unknown config key 'check_interval'; did you mean 'dynamic_checkpoint.check_interval'? "
            f"Allowed keys: {TOP_KEYS}",
        ),
        (
            {"output_dir": "o", "zzz": 5},
            f"unknown config key 'zzz'. Allowed keys: {TOP_KEYS}",
        ),
        (
            {"output_dir": "o", "dynamic_checkpoint": {"zzz": 5}},
            f"unknown config key 'dynamic_checkpoint.zzz'. Allowed keys under dynamic_checkpoint: {DYN_KEYS}",
        ),
    ],
    ids=["typo", "nested-typo", "nested-prefix", "misplaced", "no-suggestion", "nested-no-suggestion"],
)
def test_unknown_key(tmp_path: Path, data: dict[str, Any], expected: str) -> None:
    assert config_error(tmp_path, data) == expected


def test_unknown_key_suggestion_knows_the_script_keys(tmp_path: Path) -> None:
    message = config_error(tmp_path, {"output_dir": "o", "max_step": 3}, ScriptKeys)
    assert message.startswith("unknown config key 'max_step'; did you mean 'max_steps'? Allowed keys: ")
    listed = message.split("Allowed keys: ", 1)[1].split(", ")
    assert listed == sorted(listed)
    assert {"learning_rate", "max_steps", "output_dir", "save_steps", "dynamic_checkpoint"} <= set(listed)


# -- wrong types ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"output_dir": 5}, "config key 'output_dir': got 5 (int), expected a string"),
        (
            {"output_dir": "o", "save_steps": "ten"},
            "config key 'save_steps': got 'ten' (str), expected a whole number or null",
        ),
        (
            {"output_dir": "o", "save_steps": 2.5},
            "config key 'save_steps': got 2.5 (float), expected a whole number or null",
        ),
        (
            {"output_dir": "o", "save_steps": True},
            "config key 'save_steps': got True (bool), expected a whole number or null",
        ),
        (
            {"output_dir": "o", "resume_from_checkpoint": 5},
            "config key 'resume_from_checkpoint': got 5 (int), expected a string or null",
        ),
        (
            {"output_dir": "o", "dynamic_checkpoint": 5},
            "config key 'dynamic_checkpoint': got 5 (int), expected a mapping",
        ),
        (
            {"output_dir": "o", "dynamic_checkpoint": {"enabled": "yes"}},
            "config key 'dynamic_checkpoint.enabled': got 'yes' (str), expected true/false",
        ),
        (
            {"output_dir": "o", "dynamic_checkpoint": {"check_interval": "5"}},
            "config key 'dynamic_checkpoint.check_interval': got '5' (str), expected a whole number",
        ),
        (
            {"output_dir": "o", "dynamic_checkpoint": {"check_interval": 5.0}},
            "config key 'dynamic_checkpoint.check_interval': got 5.0 (float), expected a whole number",
        ),
        (
            {"output_dir": "o", "dynamic_checkpoint": {"trigger_file_path": 7}},
            "config key 'dynamic_checkpoint.trigger_file_path': got 7 (int), expected a string",
        ),
    ],
    ids=lambda v: "" if isinstance(v, str) else re.sub(r"\W+", "-", str(v))[:60],
)
def test_wrong_type(tmp_path: Path, data: dict[str, Any], expected: str) -> None:
    assert config_error(tmp_path, data) == expected


def test_wrong_type_of_a_script_key(tmp_path: Path) -> None:
    assert (
        config_error(tmp_path, {"output_dir": "o", "learning_rate": "fast"}, ScriptKeys)
        == "config key 'learning_rate': got 'fast' (str), expected a number"
    )


# -- out of range -------------------------------------------------------------------


STEPS = "a whole number of steps >= 1"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"output_dir": ""}, "config key 'output_dir': got '', expected a directory path"),
        (
            {"output_dir": "o", "save_steps": 0},
            f"config key 'save_steps': got 0, expected {STEPS}, or leave it unset for no scheduled saves",
        ),
        (
            {"output_dir": "o", "save_steps": -3},
            f"config key 'save_steps': got -3, expected {STEPS}, or leave it unset for no scheduled saves",
        ),
        (
            {"output_dir": "o", "save_total_limit": 0},
            "config key 'save_total_limit': got 0, expected a whole number >= 1, or leave it unset to keep every "
            "checkpoint",
        ),
        (
            {"output_dir": "o", "resume_from_checkpoint": ""},
            "config key 'resume_from_checkpoint': got '', expected a checkpoint directory or 'latest' "
            "(or 'latest_or_fresh': start fresh if no checkpoint passes)",
        ),
        (
            {"output_dir": "o", "dynamic_checkpoint": {"check_interval": 0}},
            f"config key 'dynamic_checkpoint.check_interval': got 0, expected {STEPS}",
        ),
        (
            {"output_dir": "o", "dynamic_checkpoint": {"check_interval": -1}},
            f"config key 'dynamic_checkpoint.check_interval': got -1, expected {STEPS}",
        ),
    ],
    ids=["output_dir", "save_steps-0", "save_steps-neg", "limit-0", "resume-empty", "interval-0", "interval-neg"],
)
def test_out_of_range(tmp_path: Path, data: dict[str, Any], expected: str) -> None:
    assert config_error(tmp_path, data) == expected


@pytest.mark.parametrize("name", ["..", "../trigger", "sub/trigger", ".", "", "/", "/tmp/", "/tmp/.."])
def test_trigger_file_path_is_a_plain_name_or_an_absolute_file_path(tmp_path: Path, name: str) -> None:
    message = config_error(tmp_path, {"output_dir": "o", "dynamic_checkpoint": {"trigger_file_path": name}})
    assert message == f"config key 'dynamic_checkpoint.trigger_file_path': got {name!r}, expected {TRIGGER_PATH}"


def test_an_absolute_trigger_file_path_is_accepted_as_axolotl_does(tmp_path: Path) -> None:
    trigger = str(tmp_path / "flags" / "save.now")
    (cfg,) = load_config(write(tmp_path, {"output_dir": "o", "dynamic_checkpoint": {"trigger_file_path": trigger}}))
    assert cfg.dynamic_checkpoint.trigger_file_path == trigger
    # The poller joins output_dir and the configured path: an absolute one stays itself.
    assert Path(cfg.output_dir) / cfg.dynamic_checkpoint.trigger_file_path == Path(trigger)


@pytest.mark.parametrize("name", ["metrics.jsonl", "checkpoint-5"])
def test_an_absolute_trigger_file_path_must_not_name_a_file_ckptbus_writes(tmp_path: Path, name: str) -> None:
    # output_dir may well be that directory.
    path = str(tmp_path / "out" / name)
    message = config_error(tmp_path, {"output_dir": "o", "dynamic_checkpoint": {"trigger_file_path": path}})
    assert message.startswith(f"config key 'dynamic_checkpoint.trigger_file_path': got {path!r}, expected a file name")


def test_missing_output_dir(tmp_path: Path) -> None:
    assert (
        config_error(tmp_path, {"save_steps": 5})
        == "config key 'output_dir' is required: the directory for checkpoints and logs, for example outputs/run1"
    )


def test_empty_file_needs_output_dir(tmp_path: Path) -> None:
    assert config_error(tmp_path, "").startswith("config key 'output_dir' is required")


# -- the file itself ------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    # The file is named once, not twice.
    assert str(info.value) == (
        f"{path}: the config file does not exist; pass the path of a YAML file, e.g. configs/tiny.yaml"
    )


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    message = config_error(tmp_path, "output_dir: o\nsave_steps: [1, 2\nseed: 3\n")
    assert message.startswith("not valid YAML: ")
    assert re.search(r"line \d+, column \d+", message), message


@pytest.mark.parametrize(("text", "kind"), [("- output_dir: o\n", "list"), ("just words\n", "str"), ("5\n", "int")])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    assert config_error(tmp_path, text) == f"the config file must hold a mapping of keys at the top, got {kind}"


def test_a_directory_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read: Is a directory"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "output_dir: o\nsave_steps: 5\nseed: 1\nsave_steps: 50\n",
            "config key 'save_steps' is written twice (on lines 2 and 4)",
        ),
        (
            "output_dir: o\ndynamic_checkpoint:\n  check_interval: 5\n  enabled: true\n  check_interval: 50\n",
            "config key 'dynamic_checkpoint.check_interval' is written twice (on lines 3 and 5)",
        ),
        (
            "output_dir: o\ndynamic_checkpoint: {signals: {sigint: none, sigint: full_exit}}\n",
            "config key 'dynamic_checkpoint.signals.sigint' is written twice (on line 2)",
        ),
    ],
    ids=["top", "nested", "flow"],
)
def test_a_key_written_twice_is_refused(tmp_path: Path, text: str, expected: str) -> None:
    # Plain YAML would keep the last value and say nothing.
    assert config_error(tmp_path, text) == f"{expected}; YAML would keep only the last one: remove one of them"


def test_the_same_key_in_two_mappings_and_an_overridden_merge_key_are_fine(tmp_path: Path) -> None:
    text = """\
output_dir: o
dynamic_checkpoint:
  enabled: true
  socket: {enabled: false}
  signals:
    <<: {sigint: none, sigterm: none}
    sigint: full_exit   # overriding a merged key is what merging is for
"""
    (cfg,) = load_config(write(tmp_path, text))
    dyn = cfg.dynamic_checkpoint
    assert (dyn.enabled, dyn.socket.enabled) == (True, False)
    assert (dyn.signals.sigint, dyn.signals.sigterm) == ("full_exit", "none")


# -- the dataclasses built directly (the Python API) ------------------------------------


def test_dataclasses_check_their_values_when_built_directly() -> None:
    with pytest.raises(ConfigError, match=r"^config key 'save_steps': got '5', expected a whole number of steps"):
        CheckpointConfig(output_dir="o", save_steps="5")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^config key 'save_total_limit': got True, expected a whole number >= 1"):
        CheckpointConfig(output_dir="o", save_total_limit=True)
    with pytest.raises(ConfigError, match=r"^config key 'dynamic_checkpoint.check_interval': got True, expected"):
        DynamicCheckpointConfig(check_interval=True)
    with pytest.raises(ConfigError, match=r"^config key 'dynamic_checkpoint.trigger_file_path': got 'a/b', expected"):
        DynamicCheckpointConfig(trigger_file_path="a/b")


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        CheckpointConfig(output_dir="")


# -- train.py refuses a bad trigger path at start-up ----------------------------------------


# -- train.py checks its config before it imports torch ------------------------------------


def imported_top_level(importtime: str) -> set[str]:
    """The top-level packages in what ``python -X importtime`` wrote (a line per import, on stderr)."""
    return {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in importtime.splitlines()
        if line.startswith("import time:") and "|" in line
    }


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            "dynamic_checkpoint:\n  trigger_file_path: ../axolotl_checkpoint.save\n",
            "config key 'dynamic_checkpoint.trigger_file_path': got '../axolotl_checkpoint.save', "
            f"expected {TRIGGER_PATH}",
        ),
        ("max_step: 5\n", "unknown config key 'max_step'; did you mean 'max_steps'?"),
        ("max_steps: 0\n", "config key 'max_steps': got 0, expected a whole number >= 1"),
        (
            "save_steps: 5\nsave_steps: 6\n",
            "config key 'save_steps' is written twice (on lines 2 and 3); YAML would keep only the last one",
        ),
    ],
    ids=["trigger-path", "typo", "train-key", "duplicate"],
)
def test_train_py_reports_a_bad_config_before_importing_torch(tmp_path: Path, body: str, expected: str) -> None:
    out = tmp_path / "out"
    path = write(tmp_path, f"output_dir: {out}\n{body}")
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", str(REPO / "train.py"), "--config", str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"train.py: {path}: {expected}" in proc.stderr
    assert "Traceback" not in proc.stderr
    imported = imported_top_level(proc.stderr)
    assert {"ckptbus", "yaml"} <= imported, "-X importtime lists what was imported"
    assert not imported & {"torch", "transformers", "accelerate"}, "the config is checked before torch is imported"
    assert not out.exists(), "nothing is started or written before the config is valid"


@pytest.mark.parametrize(
    "name", ["ckptbus-events.jsonl", "metrics.jsonl", "ckptbus.sock", "checkpoint-5", ".ckptbus-x"]
)
def test_trigger_file_path_must_not_be_a_file_ckptbus_writes(name: str) -> None:
    # Such a name would exist after the first step and trigger a save on every interval.
    with pytest.raises(ConfigError) as info:
        DynamicCheckpointConfig(trigger_file_path=name)
    message = str(info.value)
    assert message.startswith(f"config key 'dynamic_checkpoint.trigger_file_path': got {name!r}, expected a file name")
    assert "ckptbus does not write itself" in message


def test_async_save_is_off_by_default_and_must_be_a_bool(tmp_path: Path) -> None:
    assert DynamicCheckpointConfig().async_save is False
    loaded, *_ = load_config(write(tmp_path, {"output_dir": "o", "dynamic_checkpoint": {"async_save": True}}))
    assert loaded.dynamic_checkpoint.async_save is True
    with pytest.raises(ConfigError, match=re.escape("'dynamic_checkpoint.async_save': got 'yes'")):
        DynamicCheckpointConfig(async_save="yes")  # type: ignore[arg-type]


# -- what YAML makes of a word, and files YAML cannot read (issue 24) -------------------------------


@pytest.mark.parametrize("word", ["off", "Off", "OFF", "no", "false"])
def test_an_unquoted_off_is_the_off_value_of_every_key_that_has_one(tmp_path: Path, word: str) -> None:
    """YAML 1.1 reads off, no and false unquoted as false: a key with an off value takes it as that value."""
    text = (
        "output_dir: out\n"
        "dynamic_checkpoint:\n"
        f"  verify: {word}\n"
        f"  on_launcher_exit: {word}\n"
        f"  signals:\n    sigint: {word}\n    sigusr1: {word}\n"
    )
    (cfg,) = load_config(write(tmp_path, text))
    dyn = cfg.dynamic_checkpoint
    assert (dyn.verify, dyn.on_launcher_exit, dyn.signals.sigint, dyn.signals.sigusr1) == (
        "off",
        "none",
        "none",
        "none",
    )
    (quoted,) = load_config(write(tmp_path, "output_dir: out\ndynamic_checkpoint:\n  verify: 'off'\n"))
    assert quoted.dynamic_checkpoint.verify == "off"


@pytest.mark.parametrize(
    ("body", "key", "expected"),
    [
        ("verify: on", "verify", "'full' or 'sizes' or 'off'"),
        ("verify: yes", "verify", "'full' or 'sizes' or 'off'"),
        ("on_launcher_exit: true", "on_launcher_exit", "'full' or 'weights' or 'none'"),
        ("on_save_failure: off", "on_save_failure", "'continue' or 'stop'"),  # no off value: false is refused
        ("async_writer: no", "async_writer", "'thread' or 'process'"),
    ],
)
def test_yaml_true_and_false_where_they_name_no_value_are_refused(
    tmp_path: Path, body: str, key: str, expected: str
) -> None:
    message = config_error(tmp_path, f"output_dir: out\ndynamic_checkpoint:\n  {body}\n")
    got = "True" if body.split(": ")[1] in ("on", "yes", "true") else "False"
    assert message.startswith(f"config key 'dynamic_checkpoint.{key}': got {got} (bool), expected {expected}"), message
    if got == "True":
        assert "YAML reads an unquoted on, yes or true as true" in message


def test_a_config_file_that_is_not_utf8_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("output_dir: out\n# café\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: the config file is not UTF-8 text (byte 0xe9 on line 2, offset 21): save it as UTF-8"
    )
    utf16 = tmp_path / "utf16.yaml"
    utf16.write_text("output_dir: out\n", encoding="utf-16")
    with pytest.raises(ConfigError, match=r"utf16.yaml: the config file is not UTF-8 text \(byte 0xff on line 1"):
        load_config(utf16)


NESTING = "the config file nests too deeply for the YAML loader"


@pytest.mark.parametrize(
    "text",
    [
        "output_dir: " + "[" * 5000 + "]" * 5000 + "\n",
        "output_dir: out\nx:\n" + "".join(" " * (i + 1) + f"k{i}:\n" for i in range(3000)),
    ],
    ids=["flow", "block"],
)
def test_a_deeply_nested_config_file_is_a_config_error_naming_the_file(tmp_path: Path, text: str) -> None:
    message = config_error(tmp_path, text)
    assert message.startswith(NESTING) and "\n" not in message


def test_a_long_or_nested_value_is_not_echoed_whole(tmp_path: Path) -> None:
    message = config_error(tmp_path, "output_dir: " + "[" * 60 + "]" * 60 + "\n")
    assert message.startswith("config key 'output_dir': got [[[[") and message.count("[") < 300, message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"output_dir: out\nseed: \xff\n", "the config file is not UTF-8 text (byte 0xff on line 2, offset 22)"),
        (("output_dir: " + "[" * 5000 + "]" * 5000 + "\n").encode(), NESTING),
    ],
    ids=["encoding", "nesting"],
)
def test_train_py_reports_encoding_and_nesting_in_one_line(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--config", str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"train.py: {path}: {expected}"), proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
