"""The control protocol, sans-IO: no sockets, bytes in, requests or typed errors out."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portside.control import protocol
from portside.errors import ControlError, PortsideError, ProtocolError

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=10)


def test_control_errors_are_portside_errors() -> None:
    assert issubclass(ProtocolError, PortsideError)
    assert issubclass(ControlError, PortsideError)


@given(st.lists(st.binary(max_size=50).filter(lambda b: b"\n" not in b), max_size=20),
       st.data())
def test_any_split_decodes_the_same_lines(lines: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(line + b"\n" for line in lines)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = protocol.request_decoder()
    out: list[bytes] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out += [bytes(line) for line in decoder.feed(stream[start:end])]
    assert out == lines


def test_overlong_request_is_an_error() -> None:
    decoder = protocol.request_decoder()
    with pytest.raises(ProtocolError, match="longer than"):
        for _ in range(protocol.MAX_REQUEST // 1000 + 2):
            decoder.feed(b"x" * 1000)


def test_requests_round_trip() -> None:
    examples: dict[str, dict[str, Any]] = {
        "close": {"id": "7"}, "abort": {"id": "1.2"}, "max-connections": {"value": 5},
        "log-level": {"level": "debug"}, "connections": {"limit": 3, "state": "open"},
        "pause": {"listener": "immediate"}}
    for command in protocol.COMMANDS:
        args = examples.get(command, {})
        request = protocol.parse_request(protocol.request(command, args).rstrip(b"\n"), 1000)
        assert (request.command, request.args, request.uid) == (command, args, 1000)


@given(JSON)
def test_any_json_is_a_request_or_a_protocol_error(value: object) -> None:
    for message in (value, {"v": 1, "command": "close", "args": value},
                    {"v": 1, "command": "connections", "args": {"limit": value}}):
        with contextlib.suppress(ProtocolError):
            protocol.parse_request(json.dumps(message).encode())


@pytest.mark.parametrize(("line", "message"), [
    (b"{nope", "malformed JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"v": 2, "command": "stats"}', "version"),
    (b'{"v": 1}', "no 'command'"),
    (b'{"v": 1, "command": "explode"}', "unknown command"),
    (b"\xff\xfe", "malformed JSON"),
    (b'{"v": 1, "command": "stats", "args": []}', "'args'"),
    (b'{"v": 1, "command": "stats", "args": {"x": 1}}', "no argument"),
    (b'{"v": 1, "command": "close"}', "needs the argument 'id'"),
    (b'{"v": 1, "command": "close", "args": {"id": 5}}', "string"),
    (b'{"v": 1, "command": "max-connections", "args": {"value": true}}', "whole number"),
    (b'{"v": 1, "command": "max-connections", "args": {"value": 0}}', "between"),
    (b'{"v": 1, "command": "max-connections", "args": {"value": 99999999999}}', "between"),
    (b'{"v": 1, "command": "log-level", "args": {"level": "loud"}}', "one of"),
    (b'{"v": ' + b"9" * 5000 + b', "command": "stats"}', "malformed JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "malformed JSON"),
    (b'{"v": 1, "command": "' + b"x" * 10_000 + b'"}', "unknown command"),
])
def test_bad_requests_are_typed_errors(line: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message) as caught:
        protocol.parse_request(line)
    assert len(str(caught.value)) < 400  # an error never echoes the input back whole


def test_replies_round_trip() -> None:
    assert protocol.parse_reply(protocol.reply_ok({"a": 1}).rstrip(b"\n")) == {"a": 1}
    with pytest.raises(ProtocolError, match="boom"):
        protocol.parse_reply(protocol.reply_error("boom").rstrip(b"\n"))
