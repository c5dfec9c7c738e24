"""Configuration: validated dataclasses and a YAML loader.

Every check happens when the configuration is built, so a typo fails at
start-up with a message that names the key, the bad value and what is
allowed, instead of hours later at the first save.

The YAML file is flat at the top (``output_dir``, ``save_steps``, ...) with a
``dynamic_checkpoint`` block, as in axolotl. A training script adds its own
keys by passing its own dataclass to :func:`load_config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from ._errors import ConfigError
from ._names import CHECKPOINT_PREFIX, PRIVATE_PREFIX, RESERVED_PREFIXES
from ._names import RESERVED_NAMES as RESERVED_NAMES  # re-exported: it was defined here once

T = TypeVar("T")

DEFAULT_TRIGGER_FILE = "axolotl_checkpoint.save"
DEFAULT_CHECK_INTERVAL = 100


OFF_CHOICES: tuple[str, ...] = ("off", "none")
"""The values that turn a key off (``verify: off``, ``signals.sigusr1: none``). YAML's false (``off``, ``no``,
``false`` unquoted) in a config file means that value, for every key that has one."""

NULL_IS_DEFAULT = "ckptbus.null_is_default"
"""Field metadata: ``null`` for this key in a config file means the field's default."""


def _check(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': got {_short(value)}, expected {allowed}")


def _whole(value: object, minimum: int) -> bool:
    """``value`` is an int (not a bool, which Python counts as one) and at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


TRIGGER_PATH_ALLOWED = "a file name inside output_dir (no '/', not '..') or an absolute path of a file"


def _trigger_path_ok(name: object) -> bool:
    """A plain file name (inside output_dir), or an absolute path of a file as axolotl accepts (the poller
    joins ``output_dir / path``, which for an absolute path is that path)."""
    if not isinstance(name, str) or "\0" in name:
        return False
    if os.path.isabs(name):
        # "/", "/tmp/" or "/tmp/..": a directory, which is never a trigger.
        return os.path.basename(name) not in ("", ".", "..")
    return name not in ("", ".", "..") and os.sep not in name and (os.altsep is None or os.altsep not in name)


SignalAction = Literal["weights_exit", "full_exit", "full_continue", "none"]
"""What a signal asks for: save weights or a full checkpoint, then stop (``*_exit``) or go on; ``none``: not handled."""

SIGNAL_ACTIONS: tuple[SignalAction, ...] = typing.get_args(SignalAction)

OnSaveFailure = Literal["continue", "stop"]
OnError = Literal["full", "weights", "none"]
"""What training does after a save failed on any rank: go on (the default) or stop on every rank."""

ON_SAVE_FAILURE: tuple[OnSaveFailure, ...] = typing.get_args(OnSaveFailure)
ON_ERROR: tuple[OnError, ...] = typing.get_args(OnError)

Verify = Literal["full", "sizes", "off"]
"""What resume checks before loading a checkpoint: every file's size and content digest, sizes only, or nothing."""

VERIFY: tuple[Verify, ...] = typing.get_args(Verify)

OnLauncherExit = Literal["full", "weights", "none"]
"""What every rank saves before it stops when the launcher of a rank is gone; ``none``: nothing is watched."""

ON_LAUNCHER_EXIT: tuple[OnLauncherExit, ...] = typing.get_args(OnLauncherExit)

AsyncWriter = Literal["thread", "process"]
"""Where an asynchronous save's files are written: a thread of the training process, or a forked process."""

ASYNC_WRITERS: tuple[AsyncWriter, ...] = typing.get_args(AsyncWriter)


@dataclasses.dataclass(kw_only=True, slots=True)
class SignalsConfig:
    """The ``dynamic_checkpoint.signals`` block: what each signal asks for. See docs/signals.md."""

    sigint: SignalAction = "weights_exit"
    """Ctrl+C. The seed's behaviour: save the model weights, then every rank exits."""

    sigterm: SignalAction = "full_exit"
    """Preemption (SLURM, Kubernetes, torchrun's shutdown): a resumable checkpoint, then exit."""

    sighup: SignalAction = "full_exit"
    """The terminal went away; torchrun forwards it and kills the workers 30 s later, so save and exit."""

    sigusr1: SignalAction = "none"
    """Not handled by default: torchrun does not forward it, and NCCL and job tools use it for their own ends."""

    debounce_seconds: float = 1.0
    """A second stopping signal within this many seconds of the first is the same press (a launcher forwarding
    it); later, it aborts at once without finishing the checkpoint."""

    def __post_init__(self) -> None:
        for key in ("sigint", "sigterm", "sighup", "sigusr1"):
            value = getattr(self, key)
            _check(
                value in SIGNAL_ACTIONS,
                f"dynamic_checkpoint.signals.{key}",
                value,
                "one of " + ", ".join(repr(a) for a in SIGNAL_ACTIONS),
            )
        seconds = self.debounce_seconds
        _check(
            isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and 0 <= seconds <= 60,
            "dynamic_checkpoint.signals.debounce_seconds",
            seconds,
            "a number of seconds from 0 to 60",
        )

    def actions(self) -> dict[str, SignalAction]:
        """``{"SIGINT": action, ...}`` for every signal this block names."""
        return {"SIGINT": self.sigint, "SIGTERM": self.sigterm, "SIGHUP": self.sighup, "SIGUSR1": self.sigusr1}


@dataclasses.dataclass(kw_only=True, slots=True)
class SocketConfig:
    """The ``dynamic_checkpoint.socket`` block: the UNIX socket ``ckptbus request`` talks to. See docs/socket.md."""

    enabled: bool = True
    """Serve the socket (on the main process) whenever ``dynamic_checkpoint.enabled`` is true."""

    path: str | None = None
    """Socket path, absolute or relative to ``output_dir``; null: ``<output_dir>/ckptbus.sock``. A path longer
    than a UNIX socket address allows is replaced by a short one (docs/socket.md, "Long paths")."""

    timeout: float = 10.0
    """Seconds a client has to send its request line (and to read its reply) before it is disconnected."""

    def __post_init__(self) -> None:
        path = self.path
        _check(
            path is None or (isinstance(path, str) and path.strip() != "" and "\0" not in path),
            "dynamic_checkpoint.socket.path",
            path,
            "a file path (absolute, or relative to output_dir), or null for <output_dir>/ckptbus.sock",
        )
        seconds = self.timeout
        _check(
            isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and 0 < seconds <= 3600,
            "dynamic_checkpoint.socket.timeout",
            seconds,
            "a number of seconds above 0 and at most 3600",
        )


@dataclasses.dataclass(kw_only=True, slots=True)
class DynamicCheckpointConfig:
    """The ``dynamic_checkpoint`` block: checkpoints asked for while training runs."""

    enabled: bool = False
    """Turn on the on-demand triggers (trigger file; signals and socket where available)."""

    check_interval: int = DEFAULT_CHECK_INTERVAL
    """Look for the trigger file every this many optimizer steps (>= 1)."""

    trigger_file_path: str = DEFAULT_TRIGGER_FILE
    """The trigger file: a plain file name, inside ``output_dir``; or an absolute path (as axolotl allows)."""

    event_log: bool = True
    """Append every bus event to ``<output_dir>/ckptbus-events.jsonl`` (main process)."""

    signals: SignalsConfig = dataclasses.field(default_factory=SignalsConfig)
    """What Ctrl+C and preemption signals ask for: see :class:`SignalsConfig`."""

    socket: SocketConfig = dataclasses.field(default_factory=SocketConfig)
    """The UNIX socket for ``ckptbus request`` / ``status``: see :class:`SocketConfig`."""

    on_save_failure: OnSaveFailure = "continue"
    """After a save that failed (on any rank; every rank agrees): ``continue`` training, or ``stop`` every
    rank at that step (``train.py`` then exits with status 1). See docs/resume.md."""

    on_error: OnError = "full"
    """When training raises, or a rank dies: the ranks still alive save a ``full`` checkpoint (or ``weights``) of
    the last step every rank completed, on their own, then the exception goes on; ``none`` saves nothing.
    Under replicated state (DDP, one process) on one machine; see docs/crash.md."""

    async_save: bool = False
    """Full saves hold training only while every rank copies the state into host memory; a background thread
    writes the files and the checkpoint is committed at a later step, once every rank finished writing. Off:
    training waits for the whole save. See docs/performance.md."""

    async_writer: AsyncWriter = "thread"
    """With ``async_save``: who writes the files. ``thread``: a thread of the training process, after host copies
    made while the next step computes. ``process``: a process forked at the agreed step, which sees the state of
    that step through copy-on-write memory and serializes it without taking the training process's GIL (CPU
    tensors only; with CUDA tensors the thread writes). See docs/performance.md."""

    torch_save_crc32: bool = False
    """Whether the files ckptbus saves with ``torch.save`` (optimizer, scheduler, RNG states) carry the zip
    CRC32 of each record. ``torch.load`` never checks it, and computing it is most of ``torch.save``'s time for
    a large optimizer state, so it is off; ``unzip -t`` then reports CRC errors. See docs/checkpoints.md."""

    verify: Verify = "full"
    """Before resuming, check every file of the checkpoint against its manifest: its size and its content digest
    (``full``: one read of the checkpoint), its size only (``sizes``), or nothing beyond what makes a checkpoint
    complete (``off``). A file that does not match stops the run before anything is loaded. See docs/resume.md."""

    on_launcher_exit: OnLauncherExit = "full"
    """With ``enabled``: when the launcher of a rank dies without stopping it (``accelerate launch`` or torchrun's
    agent killed), every rank saves this (``full`` or ``weights``) at its next vote and stops, instead of
    training on outside the job; ``none`` leaves the ranks running. See docs/schedulers.md."""

    def __post_init__(self) -> None:
        _check(
            _whole(self.check_interval, 1),
            "dynamic_checkpoint.check_interval",
            self.check_interval,
            "a whole number of steps >= 1",
        )
        name = self.trigger_file_path
        _check(
            _trigger_path_ok(name),
            "dynamic_checkpoint.trigger_file_path",
            name,
            f"{TRIGGER_PATH_ALLOWED}, for example {DEFAULT_TRIGGER_FILE!r}",
        )
        # A name ckptbus or train.py writes itself would trigger a save on every interval. An absolute path
        # may point into output_dir too, so its last part is checked the same way.
        base = os.path.basename(name)
        reserved = base in RESERVED_NAMES or base.startswith(RESERVED_PREFIXES)
        _check(
            not reserved,
            "dynamic_checkpoint.trigger_file_path",
            name,
            "a file name that ckptbus does not write itself (not "
            + ", ".join(sorted(RESERVED_NAMES))
            + f", {CHECKPOINT_PREFIX}* or {PRIVATE_PREFIX}*), for example {DEFAULT_TRIGGER_FILE!r}",
        )
        _check(isinstance(self.async_save, bool), "dynamic_checkpoint.async_save", self.async_save, "true or false")
        _check(
            self.async_writer in ASYNC_WRITERS,
            "dynamic_checkpoint.async_writer",
            self.async_writer,
            " or ".join(repr(a) for a in ASYNC_WRITERS),
        )
        _check(
            isinstance(self.torch_save_crc32, bool),
            "dynamic_checkpoint.torch_save_crc32",
            self.torch_save_crc32,
            "true or false",
        )
        _check(
            self.on_save_failure in ON_SAVE_FAILURE,
            "dynamic_checkpoint.on_save_failure",
            self.on_save_failure,
            " or ".join(repr(a) for a in ON_SAVE_FAILURE),
        )
        _check(
            self.on_error in ON_ERROR,
            "dynamic_checkpoint.on_error",
            self.on_error,
            " or ".join(repr(a) for a in ON_ERROR),
        )
        _check(
            self.verify in VERIFY,
            "dynamic_checkpoint.verify",
            self.verify,
            " or ".join(repr(a) for a in VERIFY),
        )
        _check(
            self.on_launcher_exit in ON_LAUNCHER_EXIT,
            "dynamic_checkpoint.on_launcher_exit",
            self.on_launcher_exit,
            " or ".join(repr(a) for a in ON_LAUNCHER_EXIT),
        )


@dataclasses.dataclass(kw_only=True, slots=True)
class RemoteConfig:
    """The ``remote`` block: how checkpoints are copied to ``remote_dir`` (object storage). See docs/remote.md."""

    keep: int | None = None
    """Keep at most this many complete checkpoints in ``remote_dir``; older ones are deleted there once a newer one is
    complete there (the newest full one never). Null: keep every one."""

    exit_deadline_seconds: float = 120.0
    """At the end of the run (a stop, Ctrl+C, SIGTERM, a crash save), how long the main process waits for uploads
    still running before it exits; size it to fit the scheduler's grace period after the save itself."""

    parallelism: int = 8
    """Files, and parts of large files, transferred at once (uploads and downloads)."""

    def __post_init__(self) -> None:
        _check(
            self.keep is None or _whole(self.keep, 1),
            "remote.keep",
            self.keep,
            "a whole number >= 1, or leave it unset to keep every checkpoint in remote_dir",
        )
        seconds = self.exit_deadline_seconds
        _check(
            isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and 0 <= seconds <= 86400,
            "remote.exit_deadline_seconds",
            seconds,
            "a number of seconds from 0 to 86400",
        )
        _check(
            _whole(self.parallelism, 1) and self.parallelism <= 64, "remote.parallelism", self.parallelism, "1 to 64"
        )


@dataclasses.dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """The checkpoint keys of a run (top level of the YAML file)."""

    output_dir: str
    """Where checkpoints, metrics, the event log and the trigger file live."""

    remote_dir: str | None = None
    """An object-storage URL (``s3://bucket/prefix``): every committed checkpoint is uploaded there in the background
    after its local commit, and ``resume_from_checkpoint: latest`` looks there too. See docs/remote.md."""

    remote: RemoteConfig = dataclasses.field(default_factory=RemoteConfig, metadata={NULL_IS_DEFAULT: True})
    """How checkpoints go to ``remote_dir``: see :class:`RemoteConfig`."""

    save_steps: int | None = None
    """Save a full checkpoint every this many optimizer steps (unset: no scheduled saves)."""

    save_total_limit: int | None = None
    """Keep at most this many scheduled checkpoints; older ones are deleted after a new one is complete.
    The newest full checkpoint is never deleted. See docs/resume.md for the rule."""

    rotate_on_demand: bool = False
    """Whether on-demand checkpoints (file, signal, socket, API) count toward ``save_total_limit`` and can
    be deleted like scheduled ones. Off: they are kept until you delete them."""

    resume_from_checkpoint: str | None = None
    """A checkpoint directory to resume from; ``latest`` for the newest complete full checkpoint that passes
    verification (a fresh start if the directory holds none; a refusal if it holds some and none passes);
    ``latest_or_fresh``: the same, but a fresh start (with a warning) when none passes. See docs/resume.md."""

    dynamic_checkpoint: DynamicCheckpointConfig = dataclasses.field(
        default_factory=DynamicCheckpointConfig, metadata={NULL_IS_DEFAULT: True}
    )
    """On-demand checkpoints: see :class:`DynamicCheckpointConfig`. ``dynamic_checkpoint: null`` in a config file
    is the default (off), as axolotl reads it."""

    def __post_init__(self) -> None:
        _check(
            isinstance(self.output_dir, str) and self.output_dir != "",
            "output_dir",
            self.output_dir,
            "a directory path",
        )
        if self.remote_dir is not None:
            from ._remote_url import parse_remote

            parse_remote(self.remote_dir)  # raises ConfigError naming remote_dir
        _check(
            self.save_steps is None or _whole(self.save_steps, 1),
            "save_steps",
            self.save_steps,
            "a whole number of steps >= 1, or leave it unset for no scheduled saves",
        )
        _check(
            self.save_total_limit is None or _whole(self.save_total_limit, 1),
            "save_total_limit",
            self.save_total_limit,
            "a whole number >= 1, or leave it unset to keep every checkpoint",
        )
        _check(isinstance(self.rotate_on_demand, bool), "rotate_on_demand", self.rotate_on_demand, "true or false")
        _check(
            self.resume_from_checkpoint is None
            or (isinstance(self.resume_from_checkpoint, str) and self.resume_from_checkpoint != ""),
            "resume_from_checkpoint",
            self.resume_from_checkpoint,
            "a checkpoint directory or 'latest' (or 'latest_or_fresh': start fresh if no checkpoint passes)",
        )


# --------------------------------------------------------------------------
# Building dataclasses from mappings, with messages that say what to do.
# --------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true/false", int: "a whole number", float: "a number", str: "a string"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (nested dataclasses built)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, key)
            except ConfigError:
                continue
        raise _type_error(key, value, tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value is False:
            # YAML 1.1 reads an unquoted off, no or false as false: where a key has a value that turns it off,
            # that is the value meant (`verify: off`, `sigusr1: off`).
            off = next((choice for choice in OFF_CHOICES if choice in choices), None)
            if off is not None:
                return off
        if value in choices and not isinstance(value, bool):
            return value
        raise _type_error(key, value, tp)
    if origin is dict:
        _, value_type = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise _type_error(key, value, tp)
        return {str(k): _convert(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _type_error(key, value, tp)
        return build(typing.cast(type, tp), value, prefix=f"{key}.")
    if tp is type(None):
        if value is None:
            return None
        raise _type_error(key, value, tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, value, tp)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(key, value, tp)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _type_error(key, value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, value, tp)
    raise TypeError(f"ckptbus config cannot check annotation {tp!r} of {key}")


def _type_error(key: str, value: Any, tp: Any) -> ConfigError:
    hint = ""
    if value is True and typing.get_origin(tp) is Literal:
        # on, yes and true unquoted are YAML's true: say which word YAML changed, and what to write instead.
        hint = " (YAML reads an unquoted on, yes or true as true: write one of these values, quoted if in doubt)"
    return ConfigError(
        f"config key '{key}': got {_short(value)} ({type(value).__name__}), expected {_type_name(tp)}{hint}"
    )


def _short(value: Any, limit: int = 200) -> str:
    """A bounded repr for messages: a deeply nested or very long value is not echoed back whole."""
    try:
        text = repr(value)
    except RecursionError:
        return "<a deeply nested value>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unknown_key_error(key: str, known: Sequence[str], prefix: str, nested: Sequence[str] = ()) -> ConfigError:
    """``nested``: dotted keys of the blocks below (``dynamic_checkpoint.check_interval``), suggested when a
    key of a block was written at this level."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:
        by_leaf = {name.rsplit(".", 1)[1]: name for name in nested}
        close = [by_leaf[leaf] for leaf in difflib.get_close_matches(key, list(by_leaf), n=1, cutoff=0.6)]
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else "."
    return ConfigError(
        f"unknown config key '{prefix}{key}'{hint} Allowed keys{' under ' + prefix.rstrip('.') if prefix else ''}: "
        + ", ".join(sorted(known))
    )


def build(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build the dataclass ``cls`` from ``data``, checking every key and type.

    Raises :class:`ConfigError` for an unknown key (with the closest known key
    as a suggestion), a missing required key, or a value of the wrong type;
    range checks run in the dataclass's ``__post_init__``.
    """
    return build_many([cls], data, prefix)[0]  # type: ignore[no-any-return]


def build_many(classes: Sequence[type], data: Mapping[str, Any], prefix: str = "") -> list[Any]:
    """Split one flat mapping among several dataclasses, each taking the keys it declares."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"config{' ' + prefix.rstrip('.') if prefix else ''}: expected a mapping of keys, got {_short(data)}"
        )
    owners: dict[str, tuple[type, dataclasses.Field[Any], Any]] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            owners[f.name] = (cls, f, hints[f.name])
    kwargs: dict[type, dict[str, Any]] = {cls: {} for cls in classes}
    for raw_key, value in data.items():
        key = str(raw_key)
        if key not in owners:
            nested = [
                f"{name}.{f.name}"
                for name, (_, _, tp) in owners.items()
                if dataclasses.is_dataclass(tp)
                for f in dataclasses.fields(tp)
            ]
            raise _unknown_key_error(key, list(owners), prefix, nested)
        cls, fld, tp = owners[key]
        if value is None and fld.metadata.get(NULL_IS_DEFAULT):
            continue  # the field's default stands
        kwargs[cls][key] = _convert(value, tp, prefix + key)
    result = []
    for cls in classes:
        for f in dataclasses.fields(cls):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required and f.name not in kwargs[cls]:
                raise ConfigError(f"config key '{prefix}{f.name}' is required: {_field_doc(cls, f.name)}")
        result.append(cls(**kwargs[cls]))
    return result


def _field_doc(cls: type, name: str) -> str:
    """A short description of a required key for the error message."""
    return {"output_dir": "the directory for checkpoints and logs, for example outputs/run1"}.get(
        name, f"set {name} in the config file"
    )


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key written twice in one mapping.

    Plain YAML keeps the last value without a word, so a second ``save_steps:``
    further down a long file would silently win over the first.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        # id(mapping node) -> its dotted key and a ".", so a message names 'dynamic_checkpoint.check_interval'.
        # A parent mapping is always constructed before the mappings inside it.
        self._prefixes: dict[int, str] = {}

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        prefix = self._prefixes.get(id(node), "")
        lines: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults`: overriding a merged key is what merging is for
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = lines.get(key)
            except TypeError:
                continue  # an unhashable key: SafeLoader reports it below
            if first is not None:
                where = f"on line {line}" if first == line else f"on lines {first} and {line}"
                raise ConfigError(
                    f"config key '{prefix}{key}' is written twice ({where}); YAML would keep only the last one: "
                    "remove one of them"
                )
            lines[key] = line
            if isinstance(value_node, yaml.MappingNode):
                self._prefixes.setdefault(id(value_node), f"{prefix}{key}.")
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping from ``path``; errors name the file and the line. A key written twice in one
    mapping is an error (:class:`ConfigError`) naming the key and both lines."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{p}: the config file does not exist; pass the path of a YAML file, e.g. configs/tiny.yaml"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{p}: the config file cannot be read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{p}: the config file is not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}, offset "
            f"{exc.start}): save it as UTF-8"
        ) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except ConfigError as exc:  # a duplicate key
        raise ConfigError(f"{p}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    except RecursionError:
        # The loader recurses once per level; Python's stack ends it before any config could need that depth.
        raise ConfigError(
            f"{p}: the config file nests too deeply for the YAML loader (brackets or indentation hundreds of "
            "levels deep); a ckptbus config is at most three levels deep"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the config file must hold a mapping of keys at the top, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike[str], *extra: type) -> list[Any]:
    """Load ``path`` into a :class:`CheckpointConfig` followed by one instance of each ``extra`` dataclass.

    ``extra`` lets a training script declare its own top-level keys (model
    size, learning rate, ...) so that every key in the file is checked.
    """
    data = read_yaml(path)  # its errors name the file already
    try:
        return build_many([CheckpointConfig, *extra], data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
