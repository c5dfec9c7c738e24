"""The wire protocol of the ckptbus socket: newline-delimited JSON, version 1.

A client connects, sends one request (one JSON object on one line, at most
:data:`MAX_LINE_BYTES` bytes with the newline) and reads reply lines until the
server closes the connection. ``docs/socket.md`` is the specification with
examples; this module is its only implementation (server and CLI share it)
and imports nothing beyond the standard library and :mod:`ckptbus._errors`.

Requests::

    {"v": 1, "op": "status"}
    {"v": 1, "op": "save", "kind": "full", "label": "before lr drop", "wait": true}

``v`` may be left out (it means 1); ``kind`` defaults to ``full``, ``label``
to null, ``wait`` to true. Unknown fields are refused, so a typo never passes
silently, and so is a field given twice (JSON would let the last one win).

A connection that ends without sending anything but JSON whitespace made no
request (:func:`is_blank`); a last line without its newline still counts.

Replies carry ``v``, ``ok`` and, when ``ok`` is false, ``error`` =
``{"code": ..., "message": ...}`` with a code from :data:`ERROR_CODES`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from ._errors import CkptbusError
from ._events import SAVE_KINDS, SaveKind

PROTOCOL_VERSION: Final = 1
SUPPORTED_VERSIONS: Final = (1,)
MAX_LINE_BYTES: Final = 64 * 1024
"""A request line longer than this (newline included) is refused with ``line_too_long``."""
MAX_REQUEST_BYTES: Final = MAX_LINE_BYTES - 1
"""The longest request without its newline: what a server may read before the line is too long."""
JSON_WHITESPACE: Final = b" \t\n\r"
"""What JSON skips. Not ``bytes.strip()``'s set: a lone ``\\v`` or ``\\f`` is input, answered ``bad_json``."""
MAX_REPLY_BYTES: Final = 1024 * 1024
"""What a client accepts as one reply line (a status reply of a big run stays far below)."""
MAX_LABEL_CHARS: Final = 256
OPS: Final = ("save", "status")

ERROR_CODES: Final = {
    "bad_json": "the line is not UTF-8 JSON, or not a JSON object",
    "bad_request": "a field is missing, unknown, given twice, or of the wrong type or value",
    "unknown_op": "op is not one of the operations of this version",
    "unsupported_version": "v is a protocol version this server does not speak",
    "line_too_long": f"the request line is longer than {MAX_LINE_BYTES} bytes",
    "timeout": "no complete request line arrived within the server's timeout",
    "forbidden": "the client runs as another user than the training run",
    "busy": "too many clients or pending requests; try again",
    "save_failed": "the checkpoint was not written (the message says why)",
    "shutting_down": "the run is ending; the request was not served",
    "internal": "the server hit an unexpected error (see the training log)",
}

_SAVE_FIELDS: Final = frozenset({"v", "op", "kind", "label", "wait"})
_STATUS_FIELDS: Final = frozenset({"v", "op"})


class ProtocolError(CkptbusError):
    """A request or reply that breaks the protocol. ``code`` is one of :data:`ERROR_CODES`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class SaveRequest:
    """``op: save``: ask the run for a checkpoint."""

    kind: SaveKind = "full"
    label: str | None = None
    wait: bool = True


@dataclass(frozen=True, slots=True)
class StatusRequest:
    """``op: status``: where the run is."""


Request = SaveRequest | StatusRequest


def parse_request(line: bytes) -> Request:
    """Parse one request line (with or without its newline).

    Raises :class:`ProtocolError` for anything that is not a valid request;
    never any other exception, whatever the bytes (the fuzz tests hold it to that).
    """
    size = len(line.removesuffix(b"\n"))
    if size > MAX_REQUEST_BYTES:
        raise line_too_long(size)
    data = _load_object(line, "request", pairs_hook=_refuse_duplicate_keys)
    version = data.get("v", PROTOCOL_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version not in SUPPORTED_VERSIONS:
        raise ProtocolError(
            "unsupported_version",
            f"protocol version {_short(version)} is not supported; this server speaks v in {list(SUPPORTED_VERSIONS)}",
        )
    op = data.get("op")
    if op is None:
        raise ProtocolError("bad_request", f"missing field 'op' (one of {', '.join(OPS)})")
    if not isinstance(op, str):
        raise ProtocolError("bad_request", f"field 'op' must be a string, got {_short(op)}")
    if op == "status":
        _no_unknown_fields(data, _STATUS_FIELDS, op)
        return StatusRequest()
    if op == "save":
        _no_unknown_fields(data, _SAVE_FIELDS, op)
        return SaveRequest(kind=_kind(data.get("kind", "full")), label=_label(data.get("label")), wait=_wait(data))
    raise ProtocolError("unknown_op", f"unknown op {_short(op)}; the operations are {', '.join(OPS)}")


def line_too_long(size: int | None = None) -> ProtocolError:
    """The error for a request line over the limit; ``size``: its bytes without the newline, if known."""
    had = "more" if size is None else f"{size + 1}"
    return ProtocolError(
        "line_too_long", f"a request line may have at most {MAX_LINE_BYTES} bytes with its newline; this one has {had}"
    )


def is_blank(data: bytes) -> bool:
    """Whether ``data``, all a client sent before ending its input, holds no request: nothing, or JSON whitespace."""
    return not data.strip(JSON_WHITESPACE)


def encode(message: dict[str, Any]) -> bytes:
    """One protocol line: compact JSON (non-ASCII escaped) and a newline."""
    return json.dumps(message, separators=(",", ":"), default=str, allow_nan=False).encode("ascii") + b"\n"


def request_message(request: Request) -> dict[str, Any]:
    """The JSON object for ``request`` (what a client sends)."""
    if isinstance(request, StatusRequest):
        return {"v": PROTOCOL_VERSION, "op": "status"}
    return {"v": PROTOCOL_VERSION, "op": "save", "kind": request.kind, "label": request.label, "wait": request.wait}


def ok_reply(op: str, **fields: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "ok": True, "op": op, **fields}


def error_reply(code: str, message: str, **fields: Any) -> dict[str, Any]:
    if code not in ERROR_CODES:
        raise ValueError(f"unknown error code {code!r}")
    return {"v": PROTOCOL_VERSION, "ok": False, **fields, "error": {"code": code, "message": message}}


def parse_reply(line: bytes) -> dict[str, Any]:
    """Parse one reply line (client side). Raises :class:`ProtocolError` (code ``bad_json``) for garbage."""
    data = _load_object(line, "reply")
    if not isinstance(data.get("ok"), bool):
        raise ProtocolError("bad_json", f"reply has no boolean 'ok': {_short(data)}")
    if not data["ok"]:
        error = data.get("error")
        if not (
            isinstance(error, dict) and isinstance(error.get("code"), str) and isinstance(error.get("message"), str)
        ):
            raise ProtocolError("bad_json", f"error reply without error.code and error.message: {_short(data)}")
    return data


# -- helpers ------------------------------------------------------------------


def _load_object(
    line: bytes, what: str, pairs_hook: Callable[[list[tuple[str, Any]]], dict[str, Any]] | None = None
) -> dict[str, Any]:
    try:
        text = bytes(line).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("bad_json", f"{what} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        data = json.loads(text, object_pairs_hook=pairs_hook)
    except RecursionError:
        raise ProtocolError("bad_json", f"{what} nests too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and int conversions over Python's digit limit
        raise ProtocolError("bad_json", f"{what} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError("bad_json", f"{what} must be a JSON object, got {type(data).__name__}")
    return data


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for requests: a key given twice is refused (``json.loads`` keeps the last silently)."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise ProtocolError("bad_request", f"field {_short(key)} is given twice; give each field once")
        data[key] = value
    return data


def _no_unknown_fields(data: dict[str, Any], allowed: frozenset[str], op: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ProtocolError(
            "bad_request",
            f"unknown field(s) {', '.join(_short(k) for k in unknown)} for op {op!r}; "
            f"allowed: {', '.join(sorted(allowed))}",
        )


def _kind(value: Any) -> SaveKind:
    if value == "full":
        return "full"
    if value == "weights":
        return "weights"
    raise ProtocolError("bad_request", f"field 'kind' must be one of {', '.join(SAVE_KINDS)}, got {_short(value)}")


def _label(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError("bad_request", f"field 'label' must be a string or null, got {_short(value)}")
    if len(value) > MAX_LABEL_CHARS:
        raise ProtocolError("bad_request", f"field 'label' has {len(value)} characters; the limit is {MAX_LABEL_CHARS}")
    if any(ord(c) < 0x20 or 0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise ProtocolError("bad_request", "field 'label' must not hold control characters or lone surrogates")
    return value


def _wait(data: dict[str, Any]) -> bool:
    value = data.get("wait", True)
    if not isinstance(value, bool):
        raise ProtocolError("bad_request", f"field 'wait' must be true or false, got {_short(value)}")
    return value


def _short(value: Any, limit: int = 60) -> str:
    """A bounded repr for error messages (a fuzzer's megabyte string is not echoed back)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    try:
        text = repr(value)
    except RecursionError:
        return "<a deeply nested value>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
