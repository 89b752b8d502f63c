"""Framers: a byte stream in, whole messages out, and messages back to bytes. Sans-IO.

Theory of operation. ``feed(data)`` returns every message ``data`` completes. When nothing is
buffered from earlier reads, messages that lie wholly inside ``data`` are returned as slices of
it (zero-copy: valid only as long as ``data`` is, which for a handler means during the
callback); only a partial message at the end is copied into the framer's own buffer, whose size
is bounded by the framer's maximum message size. Oversized or malformed input raises
``ProtocolError``. ``eof()`` raises if the stream ended inside a message.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Generic, Literal, TypeVar

from portside.errors import ProtocolError

Message = bytes | memoryview
Buffer = bytes | bytearray | memoryview
M = TypeVar("M")


class Framer(ABC, Generic[M]):
    """Base class of framers; subclass it for your own wire format (``M``: a message)."""

    def __init__(self) -> None:
        self._pending = bytearray()
        #: The first protocol error; once set, the stream is broken and feed() raises it.
        self.error: ProtocolError | None = None

    def feed(self, data: Buffer) -> list[M]:
        """The messages that ``data`` completes, in order.

        Messages before a malformed frame are still returned, with ``error`` set; the call
        after raises it (so does a call on a stream that begins with the bad frame).
        """
        if self.error is not None:
            raise self.error
        messages: list[M] = []
        if self._pending:
            self._pending += data
            view = memoryview(self._pending)
            try:
                used = self._split_into(view, messages)
                # Copy out: the pending buffer is about to shrink under these views.
                messages = [self.detach(message) for message in messages]
            finally:
                view.release()
            del self._pending[:used]
        else:
            view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
            used = self._split_into(view, messages)
            if used < len(view) and self.error is None:
                self._pending += view[used:]
        if self.error is None:
            try:
                self.check_pending(len(self._pending))
            except ProtocolError as exc:
                self._fail(exc)
        if self.error is not None:
            self._pending.clear()  # nothing after a bad frame can be trusted
            if not messages:
                raise self.error
        return messages

    def _split_into(self, data: memoryview, messages: list[M]) -> int:
        try:
            return self.split(data, messages)
        except ProtocolError as exc:
            self._fail(exc)
            return len(data)

    def _fail(self, exc: ProtocolError) -> None:
        self.error = exc

    def eof(self) -> None:
        """The stream ended: an unfinished message, or an earlier bad frame, is an error."""
        if self.error is not None:
            raise self.error
        if self._pending:
            raise ProtocolError(f"stream ended inside a message ({len(self._pending)} bytes)")

    @property
    def buffered(self) -> int:
        """Bytes held for a message not yet complete."""
        return len(self._pending)

    @abstractmethod
    def split(self, data: memoryview, messages: list[M]) -> int:
        """Append the whole messages at the start of ``data`` to ``messages``; return how many
        bytes they used. Raise ProtocolError at a malformed frame (after appending those
        before it)."""

    def detach(self, message: M) -> M:
        """``message`` as a copy that no longer refers to ``split``'s input (override when
        messages are views)."""
        return message

    @abstractmethod
    def check_pending(self, size: int) -> None:
        """Raise ProtocolError when ``size`` buffered bytes can no longer become a valid message."""

    @abstractmethod
    def encode(self, message: Buffer) -> list[Buffer]:
        """The chunks to write for ``message`` (a list, so payloads are never copied)."""


class ByteFramer(Framer[Message]):
    """A framer whose messages are byte strings, returned as views where possible."""

    def detach(self, message: Message) -> Message:
        return bytes(message)


class LineFramer(ByteFramer):
    """Messages separated by ``delimiter`` (newline by default); the delimiter is removed."""

    def __init__(self, delimiter: bytes = b"\n", max_length: int = 64 * 1024) -> None:
        super().__init__()
        if not delimiter:
            raise ValueError("the delimiter must not be empty")
        self.delimiter = delimiter
        self.max_length = max_length
        self._pattern = re.compile(re.escape(delimiter))

    def split(self, data: memoryview, messages: list[Message]) -> int:
        start = 0
        size = len(self.delimiter)
        # A compiled pattern searches any buffer in place; bytes.find would need a copy.
        search = self._pattern.search
        while (found := search(data, start)) is not None:
            end = found.start()
            if end - start > self.max_length:
                raise ProtocolError(f"line longer than {self.max_length} bytes")
            messages.append(data[start:end])
            start = end + size
        return start

    def check_pending(self, size: int) -> None:
        # A delimiter may still be arriving, so allow its length on top of the maximum.
        if size > self.max_length + len(self.delimiter) - 1:
            raise ProtocolError(f"line longer than {self.max_length} bytes")

    def encode(self, message: Buffer) -> list[Buffer]:
        if self.delimiter in bytes(message):
            raise ProtocolError("a message may not contain the delimiter")
        return [message, self.delimiter]


class LengthPrefixFramer(ByteFramer):
    """Messages preceded by their length in 1, 2, 4 or 8 bytes, big- or little-endian.

    With ``inclusive`` the length counts the prefix itself (as some protocols define it).
    """

    def __init__(self, prefix_size: Literal[1, 2, 4, 8] = 4,
                 byteorder: Literal["big", "little"] = "big", inclusive: bool = False,
                 max_size: int = 1024 * 1024) -> None:
        super().__init__()
        if prefix_size not in (1, 2, 4, 8):
            raise ValueError("prefix_size must be 1, 2, 4 or 8")
        self.prefix_size = prefix_size
        self.byteorder: Literal["big", "little"] = byteorder
        self.inclusive = inclusive
        self.max_size = min(max_size, 256 ** prefix_size - 1 - (prefix_size if inclusive else 0))

    def _length(self, data: memoryview, at: int) -> int:
        length = int.from_bytes(data[at:at + self.prefix_size], self.byteorder)
        if self.inclusive:
            if length < self.prefix_size:
                raise ProtocolError(f"inclusive length {length} is shorter than its prefix")
            length -= self.prefix_size
        if length > self.max_size:
            raise ProtocolError(f"message of {length} bytes exceeds the maximum {self.max_size}")
        return length

    def split(self, data: memoryview, messages: list[Message]) -> int:
        at = 0
        total = len(data)
        prefix = self.prefix_size
        while total - at >= prefix:
            length = self._length(data, at)
            end = at + prefix + length
            if end > total:
                break
            messages.append(data[at + prefix:end])
            at = end
        return at

    def check_pending(self, size: int) -> None:
        pass  # split() already rejected an oversized length, so a partial one is bounded

    def encode(self, message: Buffer) -> list[Buffer]:
        size = len(message) if not isinstance(message, memoryview) else message.nbytes
        if size > self.max_size:
            raise ProtocolError(f"message of {size} bytes exceeds the maximum {self.max_size}")
        length = size + (self.prefix_size if self.inclusive else 0)
        return [length.to_bytes(self.prefix_size, self.byteorder), message]
