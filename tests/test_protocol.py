"""The socket protocol's parser: every valid request round-trips, every other input is a ProtocolError."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptbus._protocol import (
    ERROR_CODES,
    MAX_LABEL_CHARS,
    MAX_LINE_BYTES,
    MAX_REQUEST_BYTES,
    ProtocolError,
    SaveRequest,
    StatusRequest,
    encode,
    error_reply,
    is_blank,
    ok_reply,
    parse_reply,
    parse_request,
    request_message,
)

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
label_text = st.text(st.characters(min_codepoint=0x20, codec="utf-8"), max_size=MAX_LABEL_CHARS) | st.none()


def parses_or_refuses(line: bytes) -> Any:
    """The parser's contract: a request, or a ProtocolError with a known code. Nothing else."""
    try:
        return parse_request(line)
    except ProtocolError as exc:
        assert exc.code in ERROR_CODES
        assert exc.message
        assert len(exc.message) < 500  # bounded: nothing of a huge input is echoed back
        return exc


# -- valid requests -----------------------------------------------------------------


def test_minimal_requests() -> None:
    assert parse_request(b'{"op":"status"}') == StatusRequest()
    assert parse_request(b'{"v":1,"op":"status"}\n') == StatusRequest()
    assert parse_request(b'{"op":"save"}') == SaveRequest(kind="full", label=None, wait=True)
    assert parse_request(b'{"op":"save","kind":"weights","label":"before lr drop","wait":false}') == SaveRequest(
        kind="weights", label="before lr drop", wait=False
    )


@given(kind=st.sampled_from(["full", "weights"]), label=label_text, wait=st.booleans())
def test_save_round_trips(kind: Any, label: str | None, wait: bool) -> None:
    request = SaveRequest(kind=kind, label=label, wait=wait)
    line = encode(request_message(request))
    assert line.endswith(b"\n") and line.count(b"\n") == 1  # one line, whatever the label holds
    assert parse_request(line) == request


def test_status_round_trips() -> None:
    assert parse_request(encode(request_message(StatusRequest()))) == StatusRequest()


# -- every kind of bad input ----------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"\xff\xfe\x00garbage", "bad_json"),
        (b"", "bad_json"),
        (b"not json", "bad_json"),
        (b'{"op": "status"', "bad_json"),
        (b"[1, 2]", "bad_json"),
        (b'"status"', "bad_json"),
        (b"null", "bad_json"),
        (b"{}", "bad_request"),
        (b'{"op": 3}', "bad_request"),
        (b'{"op": null}', "bad_request"),
        (b'{"op": "explode"}', "unknown_op"),
        (b'{"op": "SAVE"}', "unknown_op"),
        (b'{"v": 2, "op": "status"}', "unsupported_version"),
        (b'{"v": "1", "op": "status"}', "unsupported_version"),
        (b'{"v": true, "op": "status"}', "unsupported_version"),
        (b'{"v": 1.0, "op": "status"}', "unsupported_version"),
        (b'{"op": "status", "kind": "full"}', "bad_request"),
        (b'{"op": "save", "lable": "typo"}', "bad_request"),
        (b'{"op": "save", "kind": "half"}', "bad_request"),
        (b'{"op": "save", "kind": 1}', "bad_request"),
        (b'{"op": "save", "kind": ["full"]}', "bad_request"),
        (b'{"op": "save", "label": 7}', "bad_request"),
        (b'{"op": "save", "label": {"a": 1}}', "bad_request"),
        (b'{"op": "save", "label": "line\\nbreak"}', "bad_request"),
        (b'{"op": "save", "label": "\\ud800"}', "bad_request"),
        (b'{"op": "save", "wait": "yes"}', "bad_request"),
        (b'{"op": "save", "wait": 1}', "bad_request"),
        (b'{"op": "save", "wait": null}', "bad_request"),
        (b'{"op": "status", "op": 5}', "bad_request"),  # a field given twice
        (b'{"op": "save", "label": "' + b"x" * (MAX_LABEL_CHARS + 1) + b'"}', "bad_request"),
    ],
)
def test_bad_requests(line: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request(line)
    assert info.value.code == code, info.value.message


@pytest.mark.parametrize(
    ("line", "key"),
    [
        (b'{"op":"status","op":"save"}', "'op'"),
        (b'{"op":"save","label":"a","label":"a"}', "'label'"),
        (b'{"v":1,"op":"save","v":1}', "'v'"),
        (b'{"op":"save","label":{"x":1,"x":2}}', "'x'"),  # inside a value too: never a silent choice
        (b'{"op":"save","\\u006bind":"full","kind":"weights"}', "'kind'"),  # the same key, spelt otherwise
    ],
)
def test_a_key_given_twice_is_refused_by_name(line: bytes, key: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request(line)
    assert info.value.code == "bad_request"
    assert f"field {key} is given twice" in info.value.message


def test_replies_with_a_key_twice_still_parse() -> None:
    # Only requests are held to it: a client keeps reading an older or foreign server's replies.
    assert parse_reply(b'{"ok":true,"ok":true}')["ok"] is True


def test_a_line_at_the_limit_parses_and_one_byte_more_does_not() -> None:
    head, tail = b'{"op":"status"', b"}"
    line = head + b" " * (MAX_REQUEST_BYTES - len(head) - len(tail)) + tail
    assert len(line + b"\n") == MAX_LINE_BYTES
    assert parse_request(line) == parse_request(line + b"\n") == StatusRequest()
    with pytest.raises(ProtocolError) as info:
        parse_request(b" " + line + b"\n")
    assert info.value.code == "line_too_long" and str(MAX_LINE_BYTES) in info.value.message


@pytest.mark.parametrize(
    ("data", "blank"),
    [(b"", True), (b" \t\r\n", True), (b"\x0b", False), (b" \x0c ", False), (b"{}", False)],
)
def test_blank_input_is_what_json_skips(data: bytes, blank: bool) -> None:
    assert is_blank(data) is blank


def test_line_over_the_limit() -> None:
    line = b'{"op": "save", "label": "' + b"x" * MAX_LINE_BYTES + b'"}'
    with pytest.raises(ProtocolError) as info:
        parse_request(line)
    assert info.value.code == "line_too_long"


def test_deep_nesting_is_refused_not_a_crash() -> None:
    # json.loads raises RecursionError on this; it must come out as a protocol error.
    for opener in (b"[", b'{"a":'):
        line = opener * ((MAX_LINE_BYTES - 100) // len(opener))
        with pytest.raises(ProtocolError) as info:
            parse_request(line)
        assert info.value.code == "bad_json"
    nested_op = b'{"op": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert isinstance(parses_or_refuses(nested_op), ProtocolError)


def test_huge_numbers_are_refused_not_a_crash() -> None:
    # Python refuses to convert ints over 4300 digits with a ValueError.
    assert parses_or_refuses(b'{"v": ' + b"9" * 10000 + b', "op": "status"}').code == "bad_json"
    assert parses_or_refuses(b'{"v": 1e999, "op": "status"}').code == "unsupported_version"
    assert parses_or_refuses(b'{"v": NaN, "op": "status"}').code == "unsupported_version"


# -- fuzz -------------------------------------------------------------------------------


@settings(max_examples=500)
@given(st.binary(max_size=4096))
def test_fuzz_random_bytes(line: bytes) -> None:
    parses_or_refuses(line)


@settings(max_examples=500)
@given(json_values)
def test_fuzz_any_json(value: Any) -> None:
    parses_or_refuses(json.dumps(value).encode())


request_like = st.dictionaries(
    st.sampled_from(["v", "op", "kind", "label", "wait", "extra"]),
    st.sampled_from([1, 2, "save", "status", "full", "weights", True, False, None, "x", 0.5, [], {}]) | json_values,
    max_size=6,
)


@settings(max_examples=1000)
@given(request_like)
def test_fuzz_near_valid_requests(data: dict[str, Any]) -> None:
    """Dicts made of the protocol's own keys and values: whatever parses must mean what the dict says."""
    result = parses_or_refuses(json.dumps(data).encode())
    if isinstance(result, ProtocolError):
        return
    assert data.get("v", 1) == 1 and not isinstance(data.get("v", 1), bool)
    assert data["op"] in ("save", "status")
    if isinstance(result, SaveRequest):
        assert result.kind == data.get("kind", "full")
        assert result.label == data.get("label")
        assert result.wait is data.get("wait", True)
        assert set(data) <= {"v", "op", "kind", "label", "wait"}
    else:
        assert set(data) <= {"v", "op"}


@settings(max_examples=300)
@given(st.binary(max_size=2048) | json_values.map(lambda v: json.dumps(v).encode()))
def test_fuzz_reply_parser(line: bytes) -> None:
    """The client's reply parser refuses garbage with ProtocolError only."""
    try:
        reply = parse_reply(line)
    except ProtocolError as exc:
        assert exc.code == "bad_json"
    else:
        assert isinstance(reply["ok"], bool)


# -- replies ------------------------------------------------------------------------------


def test_replies_are_one_line_of_json() -> None:
    ok = encode(ok_reply("save", state="completed", path="/x/checkpoint-1\n"))
    assert ok.count(b"\n") == 1
    assert parse_reply(ok)["path"] == "/x/checkpoint-1\n"
    err = parse_reply(encode(error_reply("busy", "try again")))
    assert err == {"v": 1, "ok": False, "error": {"code": "busy", "message": "try again"}}
    with pytest.raises(ValueError, match="unknown error code"):
        error_reply("no_such_code", "x")
