"""The control protocol, sans-IO: no sockets, bytes in, messages or typed errors out."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portside.control import protocol
from portside.control.protocol import LineDecoder, ProtocolError


@given(st.lists(st.binary(max_size=50).filter(lambda b: b"\n" not in b), max_size=20),
       st.data())
def test_any_split_decodes_the_same_lines(lines: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(line + b"\n" for line in lines)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = LineDecoder(max_line=64)
    out: list[bytes | ProtocolError] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out += decoder.feed(stream[start:end])
    assert out == lines


@given(st.integers(1, 5000), st.integers(1, 300))
def test_overlong_line_is_an_error_then_decoding_recovers(size: int, chunk: int) -> None:
    decoder = LineDecoder(max_line=100)
    stream = b"x" * (100 + size) + b"\n" + b"next\n"
    out: list[bytes | ProtocolError] = []
    for start in range(0, len(stream), chunk):
        out += decoder.feed(stream[start:start + chunk])
    assert len(out) == 2
    assert isinstance(out[0], ProtocolError)
    assert out[1] == b"next"


def test_requests_round_trip() -> None:
    for command in protocol.COMMANDS:
        assert protocol.parse_request(protocol.request(command).rstrip(b"\n")) == command


@pytest.mark.parametrize(("line", "message"), [
    (b"{nope", "malformed JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"v": 2, "command": "stats"}', "version"),
    (b'{"v": 1}', "no 'command'"),
    (b'{"v": 1, "command": "explode"}', "unknown command"),
    (b"\xff\xfe", "malformed JSON"),
])
def test_bad_requests_are_typed_errors(line: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        protocol.parse_request(line)


def test_replies_round_trip() -> None:
    assert protocol.parse_reply(protocol.reply_ok({"a": 1}).rstrip(b"\n")) == {"a": 1}
    with pytest.raises(ProtocolError, match="boom"):
        protocol.parse_reply(protocol.reply_error("boom").rstrip(b"\n"))
