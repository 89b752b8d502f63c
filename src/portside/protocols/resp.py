"""RESP, the Redis protocol, sans-IO: commands in, replies out (RESP2 and RESP3 replies).

A command is an array of bulk strings (``*2\\r\\n$4\\r\\nECHO\\r\\n$2\\r\\nhi\\r\\n``) or an inline
line (``PING\\r\\n``), which is how ``redis-cli`` and ``redis-benchmark`` speak. ``RespFramer``
turns a byte stream into lists of arguments (``list[bytes]``); malformed or oversized input
raises ``ProtocolError`` with Redis's wording. The ``encode_*`` functions build replies.

Theory of operation. Like Redis's ``processMultibulkBuffer``, the framer keeps its place
between reads: the arguments of a command taken so far, how many are still to come, and the
size of a bulk string whose header has been read. It consumes what it has parsed, so a
pending buffer holds only the element being received: a bulk string's body is waited for
with ``need`` (no re-reading while it trickles in), an inline line is searched only in its new
bytes. A read full of whole commands (the pipelined case) is copied once and split at every
CRLF in C (``bytes.split``); each command is taken as a slice of those pieces once its
headers are checked to be exactly ``*<count>`` and ``$<len(piece)>``, which holds precisely
when no argument contains a CRLF and the encoding is canonical. At the first command where
that fails (a CRLF inside an argument, an inline command, a partial or malformed command) the
general parser, a one-pass ``bytes.find`` loop, takes over from that command's first byte, so
both paths give the same commands and the same errors. Every size has a cap:

==================  ==========  ===================================================
limit               default     Redis's equivalent
==================  ==========  ===================================================
``max_bulk``        8 MiB       proto-max-bulk-len (512 MB)
``max_arguments``   65,536      1,048,576 multibulk length (unauthenticated: 1,024)
``max_request``     32 MiB      client-query-buffer-limit (1 GB)
``max_inline``      64 KiB      PROTO_INLINE_MAX_SIZE (64 KiB)
nesting depth       1           requests are flat arrays of bulk strings, as in Redis
==================  ==========  ===================================================

hiredis's ``Reader`` (C) parses pipelined commands about ten times faster, and was weighed as an
optional accelerator, but it parses replies, not requests: no inline commands, no caps (it
buffers any announced bulk length), and it accepts ``+simple``, ``:integer``, null and nested
elements inside a command, some indistinguishable from bulk strings once parsed. Making it
refuse exactly what this parser refuses costs per-argument Python work, most of its gain.
So portside has its own: ``_resp.pyx`` is this parser's compiled twin (same state, limits and
error texts; the same property tests run against both, and a differential test compares
them), with a fast path for a server's plain string commands. ``new_framer`` is the one place
that picks it when it imports; ``RespFramer`` here stays the reference.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Final

from portside.errors import ProtocolError
from portside.protocols.framing import Buffer, Framer
from portside.text import printable

try:
    from portside.protocols._resp import RespFramer as _Compiled
except ImportError as exc:  # not built (no compiler at install time) or built for another Python
    _Compiled = None  # type: ignore[assignment,misc]
    _import_error = str(exc)
else:
    _import_error = ""

Command = list[bytes]

KIB: Final = 1024
MIB: Final = 1024 * KIB
MAX_INLINE: Final = 64 * KIB  # as Redis: an inline command line longer than this is an error
MAX_BULK: Final = 8 * MIB
MAX_ARGUMENTS: Final = 64 * KIB
MAX_REQUEST: Final = 32 * MIB
_LINE_MAX: Final = 32  # a "*N\r\n" or "$N\r\n" header: a type byte, 20 digits, CRLF, with room
_NEWLINE = re.compile(b"\n")
_BULK_HEADER = b"$%d".__mod__
_NO_COMMAND: Final = -1


class RespFramer(Framer[Command]):
    """Splits a RESP request stream into commands (lists of bulk-string arguments)."""

    def __init__(self, max_bulk: int = MAX_BULK, max_arguments: int = MAX_ARGUMENTS,
                 max_request: int = MAX_REQUEST, max_inline: int = MAX_INLINE) -> None:
        super().__init__()
        for name, value in (("max_bulk", max_bulk), ("max_arguments", max_arguments),
                            ("max_request", max_request), ("max_inline", max_inline)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1")
        self.max_bulk = max_bulk
        self.max_arguments = max_arguments
        self.max_request = max_request
        self.max_inline = max_inline
        # A command being received: its arguments so far, how many are still to come
        # (_NO_COMMAND between commands), the size of a bulk whose header was consumed (or
        # -1), and the bytes consumed into it (for max_request and ``buffered``).
        self._args: Command = []
        self._left = _NO_COMMAND
        self._bulk = -1
        self._taken = 0
        # Bytes of a partial inline line already searched for its newline.
        self._searched = 0

    @property
    def buffered(self) -> int:
        return len(self._pending) + self._taken

    def split(self, data: memoryview, messages: list[Command]) -> int:
        total = len(data)
        at = 0
        if self._left != _NO_COMMAND:
            if self._bulk >= 0:
                # feed() calls only once the body and its CRLF are here (``need``); a direct
                # call with less consumes nothing, as feed() would.
                size = self._bulk
                if total < size + 2:
                    return 0
                if data[size] != 13 or data[size + 1] != 10:
                    raise ProtocolError("bulk string not followed by CRLF")
                self._args.append(bytes(data[:size]))
                at = size + 2
                self._taken += at
                self._bulk = -1
                self.need = 0
                self._left -= 1
                if not self._left:
                    messages.append(self._args)
                    self._args = []
                    self._left = _NO_COMMAND
                    self._taken = 0
        elif self._searched:
            # An inline line is arriving in pieces: look for its end only in the new bytes.
            if _NEWLINE.search(data, self._searched) is None:
                self._searched = total
                if total > self.max_inline:
                    raise ProtocolError("too big inline request")
                return 0
            self._searched = 0
        if at == total:
            return at
        raw = data.tobytes() if not at else bytes(data[at:])
        return at + self._parse(raw, messages)

    def _parse(self, raw: bytes, messages: list[Command]) -> int:
        """Parse ``raw`` from the framer's state; return the bytes consumed. The one-pass loop:
        locals only, ``bytes.find`` for every line, slices for every argument."""
        total = len(raw)
        at = 0
        if (self._left == _NO_COMMAND and raw[0] == 42
                and total <= self.max_bulk and total <= self.max_request):
            # Every argument and command here is shorter than the read, so within the caps.
            at = self._parse_whole(raw, messages)
        find = raw.find
        left = self._left
        args = self._args
        max_bulk = self.max_bulk
        try:
            while at < total:
                if left == _NO_COMMAND:
                    if raw[at] != 42:  # not '*': an inline command
                        end = find(b"\n", at, at + self.max_inline + 1)
                        if end < 0:
                            if total - at > self.max_inline:
                                raise ProtocolError("too big inline request")
                            self._searched = total - at
                            return at
                        line = raw[at:end]
                        at = end + 1
                        if b'"' in line or b"'" in line:
                            raise ProtocolError("quoted inline arguments are not supported")
                        if inline := line.split():
                            messages.append(inline)
                        continue
                    end = find(b"\r\n", at, at + _LINE_MAX)
                    if end < 0:
                        if total - at >= _LINE_MAX:
                            raise ProtocolError("too big mbulk count string")
                        return at
                    try:
                        count = int(raw[at + 1:end])
                    except ValueError:
                        raise ProtocolError("invalid multibulk length") from None
                    if count > self.max_arguments:
                        raise ProtocolError("invalid multibulk length")
                    command_start = at
                    at = end + 2
                    if count <= 0:
                        continue  # as Redis: an empty array is no command
                    left = count
                    self._taken = 0
                else:
                    command_start = at  # resuming a command across reads
                # The arguments: "$<size>\r\n<bytes>\r\n" each.
                while left:
                    if at >= total:
                        break
                    if raw[at] != 36:  # '$'
                        raise ProtocolError(f"expected '$', got '{printable(chr(raw[at]))}'")
                    end = find(b"\r\n", at, at + _LINE_MAX)
                    if end < 0:
                        if total - at >= _LINE_MAX:
                            raise ProtocolError("too big bulk count string")
                        break
                    try:
                        size = int(raw[at + 1:end])
                    except ValueError:
                        raise ProtocolError("invalid bulk length") from None
                    if not 0 <= size <= max_bulk:
                        raise ProtocolError("invalid bulk length")
                    body = end + 2
                    if body + size + 2 > total:
                        # The body is still arriving: consume the header, wait for the rest.
                        self._bulk = size
                        self.need = size + 2
                        at = body
                        break
                    if raw[body + size] != 13 or raw[body + size + 1] != 10:
                        raise ProtocolError("bulk string not followed by CRLF")
                    args.append(raw[body:body + size])
                    at = body + size + 2
                    left -= 1
                if left:
                    self._taken += at - command_start
                    if self._taken + max(self._bulk + 2, 0) > self.max_request:
                        raise ProtocolError("request too large")
                    return at
                if self._taken + at - command_start > self.max_request:
                    raise ProtocolError("request too large")
                messages.append(args)
                args = self._args = []
                left = _NO_COMMAND
                self._taken = 0
            return at
        finally:
            self._left = left

    def _parse_whole(self, raw: bytes, messages: list[Command]) -> int:
        """The fast path: the whole commands at the start of ``raw`` whose arguments hold no
        CRLF, in canonical encoding; the bytes they used. Stops, without error, at anything
        else, for ``_parse`` to deal with."""
        pieces = raw.split(b"\r\n")
        last = len(pieces) - 1  # the piece after the final CRLF is never part of a command
        append = messages.append
        header = _BULK_HEADER
        max_arguments = self.max_arguments
        at = 0
        try:
            while at < last:
                head = pieces[at]
                count = int(head[1:])
                end = at + 1 + 2 * count
                if not 0 < count <= max_arguments or end > last or head != b"*%d" % count:
                    break
                args = pieces[at + 2:end:2]
                if pieces[at + 1:end:2] != list(map(header, map(len, args))):
                    break
                append(args)
                at = end
        except ValueError:
            pass  # not a count: the general parser says what is wrong with it
        return sum(map(len, pieces[:at])) + 2 * at

    def check_pending(self, size: int) -> None:
        if self._taken + size > self.max_request:
            raise ProtocolError("request too large")

    def eof(self) -> None:
        super().eof()
        if self._left != _NO_COMMAND:
            raise ProtocolError("stream ended inside a command")

    def encode(self, message: Buffer) -> list[Buffer]:
        return [message]  # replies are encoded whole by the encode_* functions


#: The compiled twin of ``RespFramer`` (``_resp.pyx``), or None where it did not build.
CompiledRespFramer: type[_Compiled] | None = _Compiled


def compiled_available() -> bool:
    """Whether the compiled framer (``_resp.pyx``) imports; ``compiled_unavailable_reason``
    says why not."""
    return CompiledRespFramer is not None


def compiled_unavailable_reason() -> str:
    return _import_error


def new_framer(max_bulk: int = MAX_BULK, max_arguments: int = MAX_ARGUMENTS,
               max_request: int = MAX_REQUEST, max_inline: int = MAX_INLINE) -> Framer[Command]:
    """A RESP framer with these limits: the compiled one where it imports, else the reference
    (they behave the same; the compiled one also has ``serve``)."""
    kind = CompiledRespFramer if CompiledRespFramer is not None else RespFramer
    return kind(max_bulk, max_arguments, max_request, max_inline)


# -- replies ---------------------------------------------------------------------------------------
# RESP2 and RESP3 share these; where they differ (null, map) the caller says which to use.

NULL2: Final = b"$-1\r\n"  #: RESP2's null: a null bulk string
NULL3: Final = b"_\r\n"  #: RESP3's null


def encode_simple(text: str) -> bytes:
    return b"+" + text.encode() + b"\r\n"


def encode_error(text: str) -> bytes:
    return b"-" + text.replace("\r", " ").replace("\n", " ").encode() + b"\r\n"


def encode_integer(value: int) -> bytes:
    return b":%d\r\n" % value


def encode_bulk(value: bytes | None, null: bytes = NULL2) -> bytes:
    if value is None:
        return null
    return b"$%d\r\n%s\r\n" % (len(value), value)


def encode_array(items: Iterable[bytes | None], null: bytes = NULL2) -> bytes:
    parts = [encode_bulk(item, null) for item in items]
    return b"*%d\r\n" % len(parts) + b"".join(parts)


def encode_map(fields: Mapping[bytes, bytes], resp3: bool = True) -> bytes:
    """A map of already encoded values (RESP3 ``%``); in RESP2, a flat array of its pairs."""
    head = b"%%%d\r\n" % len(fields) if resp3 else b"*%d\r\n" % (2 * len(fields))
    return head + b"".join(encode_bulk(key) + value for key, value in fields.items())
