"""Framers: a byte stream in, whole messages out, and messages back to bytes. Sans-IO.

Theory of operation. ``feed(data)`` returns every message ``data`` completes. When nothing is
buffered from earlier reads, messages that lie wholly inside ``data`` are returned as slices of
it (zero-copy: valid only as long as ``data`` is, which for a handler means during the
callback); only the unconsumed tail is copied into the framer's own buffer, whose size the
framer's limits bound. Oversized or malformed input raises ``ProtocolError``. ``eof()`` raises
if the stream ended inside a message.

Work per read is O(new bytes), however finely a message is cut (as Redis keeps ``bulklen``
between reads and h11's ``ReceiveBuffer`` its scan offset). Two things make it so:

- ``split`` resumes. The next ``split`` sees this call's unconsumed tail (``data[used:]``) at
  the start of its input, followed by the new bytes, so a framer may remember how far into
  that tail it already looked (a scan offset, a parsed length, arguments taken so far).
- ``need``. A framer that knows how many bytes it needs before it can progress (a length
  prefix read, a bulk string's size) sets ``need``; until that many are buffered, ``feed``
  only appends (amortised O(1) per byte) and does not call ``split`` at all.
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
        #: Bytes ``split`` needs at the start of its input before it can make progress (0: any).
        self.need = 0
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
        pending = self._pending
        if pending:
            pending += data
            if len(pending) >= self.need:
                view = memoryview(pending)
                try:
                    used = self._split_into(view, messages)
                    if messages:
                        # Copy out: the pending buffer is about to shrink under these views.
                        messages = [self.detach(message) for message in messages]
                finally:
                    view.release()
                del pending[:used]  # O(1): a bytearray drops its head by moving its start
        else:
            view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
            used = self._split_into(view, messages) if len(view) >= self.need else 0
            if used < len(view) and self.error is None:
                pending += view[used:]
        if self.error is None and pending:
            try:
                self.check_pending(len(pending))
            except ProtocolError as exc:
                self._fail(exc)
        if self.error is not None:
            pending.clear()  # nothing after a bad frame can be trusted
            if not messages:
                raise self.error
        return messages

    def _split_into(self, data: memoryview, messages: list[M]) -> int:
        try:
            return self.split(data, messages)
        except ProtocolError as exc:
            # Without its traceback: the frames would keep split()'s views of the buffer
            # alive (and with them its export) for as long as ``error`` is kept.
            self._fail(exc.with_traceback(None))
            return len(data)

    def _fail(self, exc: ProtocolError) -> None:
        self.error = exc

    def eof(self) -> None:
        """The stream ended: an unfinished message, or an earlier bad frame, is an error."""
        if self.error is not None:
            raise self.error
        if self.buffered:
            raise ProtocolError(f"stream ended inside a message ({self.buffered} bytes)")

    @property
    def buffered(self) -> int:
        """Bytes held for a message not yet complete (a message has begun when this is > 0)."""
        return len(self._pending)

    @abstractmethod
    def split(self, data: memoryview, messages: list[M]) -> int:
        """Append the whole messages at the start of ``data`` to ``messages``; return how many
        bytes were consumed (usually the end of the last whole message; a framer that keeps a
        partly parsed message itself may consume more). Raise ProtocolError at a malformed
        frame (after appending those before it). See the module docstring for resuming."""

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
    """Messages separated by ``delimiter`` (newline by default); the delimiter is removed.

    ``max_length`` caps a line (64 KiB by default, Redis's inline limit): past it the stream is
    a protocol error, and at most that much (plus a partial delimiter) is ever buffered.
    """

    def __init__(self, delimiter: bytes = b"\n", max_length: int = 64 * 1024) -> None:
        super().__init__()
        if not delimiter:
            raise ValueError("the delimiter must not be empty")
        if max_length < 0:
            raise ValueError("max_length must be >= 0")
        self.delimiter = delimiter
        self.max_length = max_length
        self._pattern = re.compile(re.escape(delimiter))
        # Bytes at the start of split's next input already searched for a delimiter.
        self._searched = 0

    def split(self, data: memoryview, messages: list[Message]) -> int:
        start = 0
        size = len(self.delimiter)
        limit = self.max_length
        # A compiled pattern searches any buffer in place; bytes.find would need a copy.
        search = self._pattern.search
        found = search(data, self._searched)
        while found is not None:
            end = found.start()
            if end - start > limit:
                raise ProtocolError(f"line longer than {limit} bytes")
            messages.append(data[start:end])
            start = end + size
            found = search(data, start)
        # Resume after what was searched, less a delimiter that may be cut at the end.
        self._searched = max(0, len(data) - start - size + 1)
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
    ``max_size`` caps a message body (1 MiB by default); a larger length is a protocol error
    as soon as its prefix arrives, before any of the body is buffered.
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
        self.need = 0
        while total - at >= prefix:
            length = self._length(data, at)
            end = at + prefix + length
            if end > total:
                self.need = prefix + length  # feed() waits for the whole body: no re-reading
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
