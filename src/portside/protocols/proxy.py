"""The PROXY protocol (HAProxy's), versions 1 and 2, sans-IO.

A load balancer that speaks it sends one header before the client's bytes, naming the original
client and the address it connected to. ``parse_proxy_header(data, accept)`` looks at the
first bytes of a connection and returns ``NEED_DATA`` (the header is not complete yet), a
``ProxyHeader`` (with how many bytes it used), or raises ``ProtocolError`` (not a header, a
malformed one, or one over the size limit). No sockets, no clocks.

v1 is a text line: ``PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\\r\\n`` (at most 107 bytes).
v2 is binary: a 12-byte signature, version/command, family/transport, a 2-byte length, the
addresses, then TLVs (type, 2-byte length, value), including an optional CRC32c checksum.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass, field
from typing import Final

from portside.errors import ProtocolError

V1_PREFIX: Final = b"PROXY "
V1_MAX: Final = 107  # the specification's longest v1 line, CRLF included
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX: Final = 16 + 2048  # generous for TLVs; HAProxy sends far less
PP2_TYPE_CRC32C: Final = 0x03


class Version(enum.Enum):
    """Which header versions a listener accepts."""

    OFF = "off"
    V1 = "v1"
    V2 = "v2"
    ANY = "any"


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed header. ``source`` is the original client, ``destination`` where it connected.

    ``local`` headers (v2 LOCAL, v1 UNKNOWN) carry no addresses: the balancer's own connection,
    such as a health check; then source and destination are None.
    """

    version: int
    length: int
    local: bool = False
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    tlvs: dict[int, bytes] = field(default_factory=dict)


def parse_proxy_header(data: bytes | bytearray | memoryview,
                       accept: Version = Version.ANY) -> ProxyHeader | _NeedData:
    """Parse the header at the start of ``data`` (see the module docstring)."""
    raw = bytes(data[:V2_MAX])
    if accept in (Version.V2, Version.ANY) and _could_be(raw, V2_SIGNATURE):
        if len(raw) < len(V2_SIGNATURE):
            return NEED_DATA
        return _parse_v2(raw)
    if accept in (Version.V1, Version.ANY) and _could_be(raw, V1_PREFIX):
        if len(raw) < len(V1_PREFIX):
            return NEED_DATA
        return _parse_v1(raw)
    if accept is Version.ANY and (_could_be(raw, V2_SIGNATURE) or _could_be(raw, V1_PREFIX)):
        return NEED_DATA
    expected = {Version.V1: "v1", Version.V2: "v2"}.get(accept, "v1 or v2")
    raise ProtocolError(f"expected a PROXY protocol {expected} header")


def _could_be(raw: bytes, prefix: bytes) -> bool:
    size = min(len(raw), len(prefix))
    return raw[:size] == prefix[:size]


def _parse_v1(raw: bytes) -> ProxyHeader | _NeedData:
    end = raw.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(raw) >= V1_MAX:
            raise ProtocolError("PROXY v1 header longer than 107 bytes")
        if b"\n" in raw or b"\r" in raw[:-1]:
            raise ProtocolError("PROXY v1 header not ended by CRLF")
        return NEED_DATA
    try:
        line = raw[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("PROXY v1 header is not ASCII") from None
    parts = line.split(" ")
    length = end + 2
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(1, length, local=True)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProtocolError(f"malformed PROXY v1 header {line[:60]!r}")
    _, family, source, destination, source_port, destination_port = parts
    version = 4 if family == "TCP4" else 6
    return ProxyHeader(1, length, source=(_ip(source, version), _port(source_port)),
                       destination=(_ip(destination, version), _port(destination_port)))


def _ip(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProtocolError(f"bad address {text[:45]!r} in PROXY header") from None
    if address.version != version:
        raise ProtocolError(f"address {text!r} does not match TCP{version}")
    return str(address)


def _port(text: str) -> int:
    if not text.isdigit() or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ProtocolError(f"bad port {text[:8]!r} in PROXY header")
    return int(text)


_V2_ADDRESSES = {0x11: (12, 4), 0x12: (12, 4), 0x21: (36, 16), 0x22: (36, 16)}


def _parse_v2(raw: bytes) -> ProxyHeader | _NeedData:
    if len(raw) < 16:
        return NEED_DATA
    version_command, family_protocol, size = struct.unpack_from("!BBH", raw, 12)
    if version_command >> 4 != 2:
        raise ProtocolError(f"PROXY v2 header with version {version_command >> 4}")
    command = version_command & 0x0F
    if command > 1:
        raise ProtocolError(f"PROXY v2 header with unknown command {command}")
    if 16 + size > V2_MAX:
        raise ProtocolError(f"PROXY v2 header of {16 + size} bytes is over the limit")
    if len(raw) < 16 + size:
        return NEED_DATA
    body = raw[16:16 + size]
    length = 16 + size
    if command == 0:  # LOCAL: the balancer speaking for itself
        return ProxyHeader(2, length, local=True, tlvs=_tlvs(raw, body, 0))
    if family_protocol == 0x00:  # UNSPEC: addresses unknown
        return ProxyHeader(2, length, local=True, tlvs=_tlvs(raw, body, 0))
    layout = _V2_ADDRESSES.get(family_protocol)
    if layout is None:
        raise ProtocolError(f"PROXY v2 family/transport 0x{family_protocol:02x} not supported")
    address_size, ip_size = layout
    if size < address_size:
        raise ProtocolError("PROXY v2 header too short for its addresses")
    source_ip = ipaddress.ip_address(body[:ip_size])
    destination_ip = ipaddress.ip_address(body[ip_size:2 * ip_size])
    source_port, destination_port = struct.unpack_from("!HH", body, 2 * ip_size)
    return ProxyHeader(2, length, source=(str(source_ip), source_port),
                       destination=(str(destination_ip), destination_port),
                       tlvs=_tlvs(raw, body, address_size))


def _tlvs(raw: bytes, body: bytes, at: int) -> dict[int, bytes]:
    tlvs: dict[int, bytes] = {}
    checksum_at = -1
    while at < len(body):
        if len(body) - at < 3:
            raise ProtocolError("truncated TLV in PROXY v2 header")
        kind, size = struct.unpack_from("!BH", body, at)
        if at + 3 + size > len(body):
            raise ProtocolError("TLV longer than the PROXY v2 header")
        tlvs[kind] = body[at + 3:at + 3 + size]
        if kind == PP2_TYPE_CRC32C:
            if size != 4:
                raise ProtocolError("CRC32c TLV of the wrong size")
            checksum_at = 16 + at + 3
        at += 3 + size
    if checksum_at >= 0:
        header = bytearray(raw[:16 + len(body)])
        header[checksum_at:checksum_at + 4] = b"\x00\x00\x00\x00"
        if crc32c(bytes(header)) != struct.unpack("!I", tlvs[PP2_TYPE_CRC32C])[0]:
            raise ProtocolError("PROXY v2 header checksum does not match")
    return tlvs


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE: Final = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as PROXY v2 checksums use it."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def encode_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A v1 header (for tests and for clients that speak PROXY themselves)."""
    family = "TCP6" if ":" in source[0] else "TCP4"
    return (f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n"
            .encode())


def encode_v2(source: tuple[str, int] | None, destination: tuple[str, int] | None,
              tlvs: dict[int, bytes] | None = None, checksum: bool = False) -> bytes:
    """A v2 PROXY header (LOCAL when ``source`` is None)."""
    body = b""
    if source is None or destination is None:
        command, family = 0x20, 0x00
    else:
        command = 0x21
        v6 = ":" in source[0]
        family = 0x21 if v6 else 0x11
        body = (ipaddress.ip_address(source[0]).packed +
                ipaddress.ip_address(destination[0]).packed +
                struct.pack("!HH", source[1], destination[1]))
    for kind, value in (tlvs or {}).items():
        body += struct.pack("!BH", kind, len(value)) + value
    if checksum:
        body += struct.pack("!BH", PP2_TYPE_CRC32C, 4) + b"\x00" * 4
    header = bytearray(V2_SIGNATURE + struct.pack("!BBH", command, family, len(body)) + body)
    if checksum:
        header[-4:] = struct.pack("!I", crc32c(bytes(header)))
    return bytes(header)


def encode_header(version: int, source: object, destination: object) -> bytes:
    """The header a proxy sends for a client at ``source`` that connected to ``destination``
    (socket addresses as Python gives them: ``(host, port, ...)`` tuples, or a Unix path).

    Where the addresses cannot be said (a Unix-socket client) the header says so: v1
    ``UNKNOWN``, v2 ``LOCAL``. An IPv4 address beside an IPv6 one is written IPv4-mapped,
    since a header names a single family.
    """
    if version not in (1, 2):
        raise ValueError(f"PROXY protocol version 1 or 2, not {version!r}")
    if not (isinstance(source, tuple) and isinstance(destination, tuple)
            and len(source) >= 2 and len(destination) >= 2):
        return b"PROXY UNKNOWN\r\n" if version == 1 else encode_v2(None, None)
    ends = [(str(source[0]).partition("%")[0], int(source[1])),
            (str(destination[0]).partition("%")[0], int(destination[1]))]
    if (":" in ends[0][0]) != (":" in ends[1][0]):
        ends = [(host if ":" in host else f"::ffff:{host}", port) for host, port in ends]
    if version == 1:
        return encode_v1(ends[0], ends[1])
    return encode_v2(ends[0], ends[1])
