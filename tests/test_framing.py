"""Framers, property-based: any split decodes the same, encode-then-decode is the identity,
and the limits hold. No sockets."""

from __future__ import annotations

import itertools
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portside.errors import ProtocolError
from portside.protocols.framing import Framer, LengthPrefixFramer, LineFramer, Message


def decode_in_pieces(framer: Framer[Message], stream: bytes, cuts: list[int]) -> list[bytes]:
    out: list[bytes] = []
    bounds = [0, *sorted(cuts), len(stream)]
    for start, end in itertools.pairwise(bounds):
        out += [bytes(message) for message in framer.feed(stream[start:end])]
    framer.eof()
    return out


lines = st.lists(st.binary(max_size=100).map(lambda b: b.replace(b"\r\n", b"")), max_size=30)


@given(lines, st.lists(st.integers(0, 4000), max_size=20), st.sampled_from([b"\n", b"\r\n"]))
def test_lines_any_split(messages: list[bytes], cuts: list[int], delimiter: bytes) -> None:
    messages = [m.replace(b"\n", b"").replace(b"\r", b"") for m in messages]
    framer = LineFramer(delimiter=delimiter, max_length=100)
    stream = b"".join(b"".join(framer.encode(m)) for m in messages)
    assert decode_in_pieces(framer, stream, [c % (len(stream) + 1) for c in cuts]) == messages


prefix_sizes = st.sampled_from([1, 2, 4, 8])
orders = st.sampled_from(["big", "little"])


@given(st.lists(st.binary(max_size=200), max_size=30), st.lists(st.integers(0, 10_000),
       max_size=20), prefix_sizes, orders, st.booleans())
def test_length_prefix_round_trip_any_split(
        messages: list[bytes], cuts: list[int], prefix: Literal[1, 2, 4, 8],
        order: Literal["big", "little"], inclusive: bool) -> None:
    framer = LengthPrefixFramer(prefix, order, inclusive, max_size=200)
    stream = b"".join(b"".join(bytes(c) for c in framer.encode(m)) for m in messages)
    assert decode_in_pieces(framer, stream, [c % (len(stream) + 1) for c in cuts]) == messages


def test_zero_copy_when_a_message_lies_in_one_buffer() -> None:
    framer = LengthPrefixFramer(2)
    data = bytearray(b"\x00\x03abc\x00\x02de")
    first, second = framer.feed(memoryview(data))
    assert isinstance(first, memoryview) and first.obj is data
    assert bytes(first) == b"abc" and bytes(second) == b"de"


@given(st.integers(1, 10_000), st.integers(1, 500))
def test_overlong_line_is_rejected_with_bounded_buffering(extra: int, chunk: int) -> None:
    framer = LineFramer(max_length=1000)
    stream = b"x" * (1000 + extra) + b"\n"
    with pytest.raises(ProtocolError, match="longer than"):
        for start in range(0, len(stream), chunk):
            framer.feed(stream[start:start + chunk])
            assert framer.buffered <= 1000


@given(prefix_sizes, st.integers(1, 1000))
def test_oversized_length_is_rejected_before_the_body(prefix: Literal[1, 2, 4, 8],
                                                      excess: int) -> None:
    limit = 100
    framer = LengthPrefixFramer(prefix, max_size=limit)
    length = min(limit + excess, 256 ** prefix - 1)
    if length <= limit:
        return
    with pytest.raises(ProtocolError, match="exceeds"):
        framer.feed(length.to_bytes(prefix, "big"))


def test_inclusive_length_shorter_than_prefix_is_malformed() -> None:
    with pytest.raises(ProtocolError, match="shorter than its prefix"):
        LengthPrefixFramer(4, inclusive=True).feed(b"\x00\x00\x00\x02")


def test_truncated_stream_is_an_error_at_eof() -> None:
    framer = LengthPrefixFramer(4)
    framer.feed(b"\x00\x00\x00\x05ab")
    with pytest.raises(ProtocolError, match="inside a message"):
        framer.eof()


def test_encode_refuses_what_cannot_be_framed() -> None:
    with pytest.raises(ProtocolError):
        LineFramer().encode(b"two\nlines")
    with pytest.raises(ProtocolError):
        LengthPrefixFramer(1).encode(b"x" * 300)


def test_messages_before_a_bad_frame_are_kept() -> None:
    framer = LengthPrefixFramer(1, max_size=10)
    assert [bytes(m) for m in framer.feed(b"\x02ok\xff")] == [b"ok"]
    assert framer.error is not None
    with pytest.raises(ProtocolError):
        framer.feed(b"more")
    with pytest.raises(ProtocolError):
        framer.eof()


def feed_all(framer: Framer[Message], stream: bytes, cuts: list[int]) -> tuple[list[bytes], bool]:
    """Messages and whether the stream was a protocol error, when cut at ``cuts``."""
    out: list[bytes] = []
    try:
        out = decode_in_pieces(framer, stream, [c % (len(stream) + 1) for c in cuts])
    except ProtocolError:
        return out, True
    return out, False


@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=40), prefix_sizes)
def test_any_bytes_any_split_same_messages_or_error(stream: bytes, cuts: list[int],
                                                    prefix: Literal[1, 2, 4, 8]) -> None:
    """Arbitrary input under tight limits: where it is cut does not change whether it is a
    protocol error (each feed then works from the state the last one left)."""
    for make in (lambda: LineFramer(b"\r\n", max_length=20),
                 lambda: LengthPrefixFramer(prefix, max_size=30)):
        whole = feed_all(make(), stream, [])
        assert feed_all(make(), stream, cuts)[1] == whole[1]
        assert feed_all(make(), stream, list(range(len(stream))))[1] == whole[1]
