"""The control protocol, sans-IO: one JSON object per line, both ways.

A request is ``{"v": 1, "command": "stats"}``; a reply is ``{"v": 1, "ok": true, "result": ...}``
or ``{"v": 1, "ok": false, "error": "..."}``. ``LineDecoder`` turns a byte stream into lines with
a cap on their length; ``parse_request`` checks one line. No sockets, no clocks: bytes in,
messages or ``ProtocolError`` out.
"""

from __future__ import annotations

import json
from typing import Any

VERSION = 1
COMMANDS = ("pause", "resume", "shutdown", "stats")
MAX_MESSAGE = 64 * 1024  # a request is tiny; a stats reply of many workers stays far below this


class ProtocolError(ValueError):
    """A message that breaks the protocol; its text is sent back as the error reply."""


class LineDecoder:
    """Splits a byte stream into lines of at most ``max_line`` bytes (without the newline).

    An overlong line comes out as a ProtocolError in its place (once), the rest of it up to
    its newline is skipped, and the lines after it decode normally.
    """

    def __init__(self, max_line: int = MAX_MESSAGE) -> None:
        self.max_line = max_line
        self._buffer = bytearray()
        self._skipping = False

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes | ProtocolError]:
        """Add bytes; return the lines they complete, in order, an error for each overlong one."""
        buffer = self._buffer
        buffer += data
        lines: list[bytes | ProtocolError] = []
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            if self._skipping:
                self._skipping = False
            elif end - start > self.max_line:
                lines.append(self._overlong())
            else:
                lines.append(bytes(buffer[start:end]))
            start = end + 1
        del buffer[:start]
        if self._skipping:
            buffer.clear()
        elif len(buffer) > self.max_line:
            buffer.clear()
            self._skipping = True
            lines.append(self._overlong())
        return lines

    def _overlong(self) -> ProtocolError:
        return ProtocolError(f"message longer than {self.max_line} bytes")


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def request(command: str) -> bytes:
    return encode({"v": VERSION, "command": command})


def reply_ok(result: Any = None) -> bytes:
    return encode({"v": VERSION, "ok": True, "result": result})


def reply_error(error: str) -> bytes:
    return encode({"v": VERSION, "ok": False, "error": error})


def parse_request(line: bytes) -> str:
    """The command a request line asks for, or ProtocolError saying what is wrong with it."""
    message = _parse_object(line)
    version = message.get("v")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version!r} (this server speaks 1)")
    command = message.get("command")
    if not isinstance(command, str):
        raise ProtocolError("request has no 'command' string")
    if command not in COMMANDS:
        raise ProtocolError(f"unknown command {command!r} (known: {', '.join(COMMANDS)})")
    return command


def parse_reply(line: bytes) -> Any:
    """The result of a reply line; ProtocolError carries the server's error text."""
    message = _parse_object(line)
    if message.get("v") != VERSION:
        raise ProtocolError(f"unsupported protocol version {message.get('v')!r}")
    if message.get("ok") is True:
        return message.get("result")
    raise ProtocolError(str(message.get("error", "malformed reply")))


def _parse_object(line: bytes) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"malformed JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a JSON object")
    return message
