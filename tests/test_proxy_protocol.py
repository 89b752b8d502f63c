"""The PROXY protocol parser, sans-IO and fuzzed: round trips, every prefix, and garbage."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portside.errors import ProtocolError
from portside.protocols.proxy import (
    NEED_DATA,
    V2_SIGNATURE,
    ProxyHeader,
    Version,
    encode_v1,
    encode_v2,
    parse_proxy_header,
)

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)
endpoints = st.one_of(
    st.tuples(st.tuples(ipv4, ports), st.tuples(ipv4, ports)),
    st.tuples(st.tuples(ipv6, ports), st.tuples(ipv6, ports)))


@given(endpoints, st.binary(max_size=50))
def test_v1_round_trip(pair: tuple[tuple[str, int], tuple[str, int]], rest: bytes) -> None:
    source, destination = pair
    header = encode_v1(source, destination)
    parsed = parse_proxy_header(header + rest)
    assert isinstance(parsed, ProxyHeader)
    assert (parsed.version, parsed.length) == (1, len(header))
    assert (parsed.source, parsed.destination) == (source, destination)


@given(endpoints, st.dictionaries(st.integers(0xE0, 0xEF), st.binary(max_size=40), max_size=4),
       st.booleans(), st.binary(max_size=50))
def test_v2_round_trip(pair: tuple[tuple[str, int], tuple[str, int]], tlvs: dict[int, bytes],
                       checksum: bool, rest: bytes) -> None:
    source, destination = pair
    header = encode_v2(source, destination, tlvs, checksum=checksum)
    parsed = parse_proxy_header(header + rest, Version.V2)
    assert isinstance(parsed, ProxyHeader)
    assert (parsed.version, parsed.length) == (2, len(header))
    assert (parsed.source, parsed.destination) == (source, destination)
    assert {k: v for k, v in parsed.tlvs.items() if k != 0x03} == tlvs


@given(endpoints, st.booleans())
def test_every_proper_prefix_needs_more_data(pair: tuple[tuple[str, int], tuple[str, int]],
                                             v2: bool) -> None:
    header = encode_v2(*pair) if v2 else encode_v1(*pair)
    for size in range(len(header)):
        assert parse_proxy_header(header[:size]) is NEED_DATA


@given(st.binary(max_size=300))
def test_garbage_never_crashes(data: bytes) -> None:
    for accept in (Version.ANY, Version.V1, Version.V2):
        try:
            result = parse_proxy_header(data, accept)
        except ProtocolError:
            continue
        assert result is NEED_DATA or isinstance(result, ProxyHeader)


@given(st.binary(min_size=1, max_size=300))
def test_garbage_after_a_valid_signature_never_crashes(data: bytes) -> None:
    for prefix in (V2_SIGNATURE, b"PROXY "):
        with contextlib.suppress(ProtocolError):
            parse_proxy_header(prefix + data)


def test_local_and_unknown_headers_carry_no_address() -> None:
    for header in (encode_v2(None, None), b"PROXY UNKNOWN\r\n",
                   b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"):
        parsed = parse_proxy_header(header)
        assert isinstance(parsed, ProxyHeader) and parsed.local and parsed.source is None


@pytest.mark.parametrize(("data", "accept", "message"), [
    (b"GET / HTTP/1.1\r\n", Version.ANY, "expected a PROXY"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", Version.V2, "expected a PROXY protocol v2"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", Version.ANY, "malformed"),
    (b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", Version.ANY, "does not match"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n", Version.ANY, "bad port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", Version.ANY, "bad port"),
    (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", Version.ANY, "malformed"),
    (b"PROXY " + b"x" * 120, Version.ANY, "longer than 107"),
    (b"PROXY TCP4 1.2.3.4\n", Version.ANY, "CRLF"),
    (V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\x00" * 12, Version.ANY, "version 3"),
    (V2_SIGNATURE + b"\x2f\x11\x00\x0c" + b"\x00" * 12, Version.ANY, "unknown command"),
    (V2_SIGNATURE + b"\x21\x31\x00\x00", Version.ANY, "not supported"),  # AF_UNIX: unsupported
    (V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\x00" * 4, Version.ANY, "too short"),
    (V2_SIGNATURE + b"\x21\x11\xff\xff", Version.ANY, "over the limit"),
    (V2_SIGNATURE + b"\x21\x11\x00\x0e" + b"\x00" * 12 + b"\xe0\x00", Version.ANY, "truncated"),
    (V2_SIGNATURE + b"\x21\x11\x00\x0f" + b"\x00" * 12 + b"\xe0\x00\x09", Version.ANY,
     "longer than"),
])
def test_malformed_headers_are_protocol_errors(data: bytes, accept: Version,
                                               message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse_proxy_header(data, accept)


def test_bad_checksum_is_rejected() -> None:
    header = bytearray(encode_v2(("10.0.0.1", 1), ("10.0.0.2", 2), checksum=True))
    header[-1] ^= 0xFF
    with pytest.raises(ProtocolError, match="checksum"):
        parse_proxy_header(bytes(header))
