"""RESP2, the Redis protocol, sans-IO: commands in, replies out.

A command is an array of bulk strings (``*2\\r\\n$4\\r\\nECHO\\r\\n$2\\r\\nhi\\r\\n``) or an inline
line (``PING\\r\\n``), which is how ``redis-cli`` and ``redis-benchmark`` speak. ``RespFramer``
turns a byte stream into lists of arguments (``list[bytes]``), with caps on every length;
malformed input raises ``ProtocolError``. The ``encode_*`` functions build replies.
"""

from __future__ import annotations

from collections.abc import Iterable

from portside.errors import ProtocolError
from portside.protocols.framing import Buffer, Framer

Command = list[bytes]

MAX_INLINE = 64 * 1024  # as Redis: an inline command line longer than this is an error
MAX_ARGUMENTS = 1024 * 1024
MAX_BULK = 512 * 1024 * 1024


class RespFramer(Framer[Command]):
    """Splits a RESP2 request stream into commands."""

    def __init__(self, max_bulk: int = 8 * 1024 * 1024, max_arguments: int = 64 * 1024) -> None:
        super().__init__()
        self.max_bulk = min(max_bulk, MAX_BULK)
        self.max_arguments = min(max_arguments, MAX_ARGUMENTS)

    def split(self, data: memoryview, messages: list[Command]) -> int:
        raw = data.tobytes()
        at = 0
        while at < len(raw):
            parsed = self._parse_one(raw, at)
            if parsed is None:
                break
            command, at = parsed
            if command:
                messages.append(command)
        return at

    def _parse_one(self, raw: bytes, at: int) -> tuple[Command, int] | None:
        if raw[at] != 0x2A:  # not '*': an inline command
            end = raw.find(b"\n", at)
            if end < 0:
                if len(raw) - at > MAX_INLINE:
                    raise ProtocolError("too big inline request")
                return None
            line = raw[at:end].rstrip(b"\r")
            if b'"' in line or b"'" in line:
                raise ProtocolError("quoted inline arguments are not supported")
            return line.split(), end + 1
        header = _line(raw, at)
        if header is None:
            return None
        count, at = header
        if count > self.max_arguments:
            raise ProtocolError("invalid multibulk length")
        args: Command = []
        for _ in range(max(count, 0)):
            if at >= len(raw):
                return None
            if raw[at] != 0x24:  # '$'
                raise ProtocolError(f"expected '$', got {chr(raw[at])!r}")
            bulk = _line(raw, at)
            if bulk is None:
                return None
            size, at = bulk
            if not 0 <= size <= self.max_bulk:
                raise ProtocolError("invalid bulk length")
            if len(raw) < at + size + 2:
                return None
            if raw[at + size:at + size + 2] != b"\r\n":
                raise ProtocolError("bulk string not followed by CRLF")
            args.append(raw[at:at + size])
            at += size + 2
        return args, at

    def check_pending(self, size: int) -> None:
        if size > self.max_bulk + MAX_INLINE:
            raise ProtocolError("request too large")

    def encode(self, message: Buffer) -> list[Buffer]:
        return [message]  # replies are encoded whole by the encode_* functions


def _line(raw: bytes, at: int) -> tuple[int, int] | None:
    """The integer after a type byte at ``at`` and the offset after its CRLF, or None if the
    line is not complete yet."""
    end = raw.find(b"\r\n", at)
    if end < 0:
        if len(raw) - at > 32:
            raise ProtocolError("length line too long")
        return None
    try:
        return int(raw[at + 1:end]), end + 2
    except ValueError:
        raise ProtocolError(f"invalid length {raw[at + 1:end][:20]!r}") from None


def encode_simple(text: str) -> bytes:
    return b"+" + text.encode() + b"\r\n"


def encode_error(text: str) -> bytes:
    return b"-" + text.replace("\r", " ").replace("\n", " ").encode() + b"\r\n"


def encode_integer(value: int) -> bytes:
    return b":%d\r\n" % value


def encode_bulk(value: bytes | None) -> bytes:
    if value is None:
        return b"$-1\r\n"
    return b"$%d\r\n%s\r\n" % (len(value), value)


def encode_array(items: Iterable[bytes | None]) -> bytes:
    parts = [encode_bulk(item) for item in items]
    return b"*%d\r\n" % len(parts) + b"".join(parts)
