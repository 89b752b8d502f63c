"""The async style: each connection is a coroutine with a reader and a writer.

``StreamHandler.handle(reader, writer)`` runs as an asyncio task per connection. ``StreamReader``
and ``StreamWriter`` follow asyncio's streams (``read``, ``readexactly``, ``readline``,
``readuntil``, ``write``, ``drain``, ``close``, ``wait_closed``, ``get_extra_info``), so code
written for ``asyncio.start_server`` moves over with little change, while accepting, policies,
pools, limits and statistics are portside's. It needs a running asyncio loop: the ``asyncio``
or ``uvloop`` engine, or ``Server.serve()``. The callback style stays the fast path.

Reads are bounded by the reader's ``limit`` (``StreamHandler.reader_limit``) with one
exception. ``readexactly(n)`` raises ``asyncio.LimitOverrunError`` at once for ``n`` over the
limit (asyncio would buffer whatever length the peer announces); ``readuntil``/``readline``
raise it past the limit, as asyncio does. **``read()`` with no size (to EOF) is unbounded, as
in asyncio**: it buffers everything the peer sends until it closes, so use it only for peers
you trust, or loop on ``read(n)``. An overrun (or a framer's ``ProtocolError``) that escapes
``handle`` closes the connection with ``CloseReason.PROTOCOL_ERROR`` and one log line, not a
traceback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from portside.config import address_label
from portside.connection import Connection, as_layer
from portside.errors import ErrorOrigin, ProtocolError
from portside.handler import Handler, report_error
from portside.protocols.framing import Framer
from portside.reasons import CloseReason

logger = logging.getLogger("portside")

M = TypeVar("M")


class StreamReader:
    """Bytes a peer sent, buffered up to ``limit`` (past it, reading from the socket pauses).

    Resource handling: at most ``limit`` bytes plus one socket read are buffered, except
    while ``read()`` (to EOF, unbounded as in asyncio) waits; any other read that could only
    be satisfied past the limit raises ``asyncio.LimitOverrunError``.
    """

    def __init__(self, conn: Connection, limit: int) -> None:
        self._conn = as_layer(conn)  # reading is held on the reader's own account
        self._limit = limit
        self._buffer = bytearray()
        self._eof = False
        self._exception: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._to_eof = False  # read() to EOF is waiting: reading continues past the limit

    # -- fed by the handler's callbacks, on the loop ---------------------------------------------

    def feed_data(self, data: bytes | memoryview) -> None:
        self._buffer += data
        if len(self._buffer) > self._limit:
            self._conn.hold_reading(True)
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        self._exception = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self._waiter = None

    async def _wait(self) -> None:
        if self._exception is not None:
            raise self._exception
        if self._conn.is_open and (len(self._buffer) <= self._limit or self._to_eof):
            # Someone wants more than is buffered, and there is room (or read() to EOF
            # asked for everything): read again (reading may have been held above the limit).
            self._conn.hold_reading(False)
        self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter

    def _take(self, size: int) -> bytes:
        if size >= len(self._buffer):
            data = bytes(self._buffer)
            self._buffer.clear()
        else:
            data = bytes(memoryview(self._buffer)[:size])
            del self._buffer[:size]
        if len(self._buffer) <= self._limit // 2 and self._conn.is_open:
            self._conn.hold_reading(False)
        return data

    # -- the asyncio.StreamReader interface ------------------------------------------------------

    def at_eof(self) -> bool:
        return self._eof and not self._buffer

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes; b"" at EOF. With ``n`` < 0, everything until EOF: UNBOUNDED, as
        in asyncio (the reader limit does not apply), so only for peers you trust."""
        if n == 0:
            return b""
        if n < 0:
            self._to_eof = True
            try:
                while not self._eof:
                    await self._wait()
            finally:
                self._to_eof = False
            return self._take(len(self._buffer))
        while not self._buffer and not self._eof:
            await self._wait()
        return self._take(n)

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes (``IncompleteReadError`` at EOF before them). ``n`` over the
        reader's limit raises ``LimitOverrunError`` at once: a peer-chosen length cannot make
        the reader buffer without bound."""
        if n > self._limit:
            raise asyncio.LimitOverrunError(
                f"readexactly({n}) is over the reader limit of {self._limit} bytes", 0)
        if n < 0:
            raise ValueError("readexactly size can not be less than zero")
        while len(self._buffer) < n:
            if self._eof:
                partial = self._take(len(self._buffer))
                raise asyncio.IncompleteReadError(partial, n)
            await self._wait()
        return self._take(n)

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        """Up to and including ``separator``; bounded by the limit. Each wait searches only
        the new bytes (plus a separator's length), as asyncio keeps its offset."""
        if not separator:
            raise ValueError("separator should be at least one-byte string")
        offset = 0
        while (index := self._buffer.find(separator, offset)) < 0:
            offset = max(0, len(self._buffer) - len(separator) + 1)
            if len(self._buffer) > self._limit:
                raise asyncio.LimitOverrunError("separator not found within the limit",
                                                len(self._buffer))
            if self._eof:
                partial = self._take(len(self._buffer))
                raise asyncio.IncompleteReadError(partial, None)
            await self._wait()
        return self._take(index + len(separator))

    async def readline(self) -> bytes:
        """A line with its newline; at EOF, what is left (maybe b"")."""
        try:
            return await self.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            return exc.partial

    def __aiter__(self) -> StreamReader:
        return self

    async def __anext__(self) -> bytes:
        line = await self.readline()
        if not line:
            raise StopAsyncIteration
        return line

    async def messages(self, framer: Framer[M]) -> AsyncIterator[M]:
        """Whole messages through ``framer`` until EOF (``async for m in reader.messages(f)``)."""
        while True:
            while not self._buffer and not self._eof:
                await self._wait()
            if not self._buffer and self._eof:
                framer.eof()
                return
            for message in framer.feed(self._take(len(self._buffer))):
                yield message


class StreamWriter:
    """Writes to a connection; ``drain()`` waits while its write buffer is over high water."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._closed = asyncio.get_running_loop().create_future()

    @property
    def connection(self) -> Connection:
        return self._conn

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._conn.write(data)

    def writelines(self, chunks: list[bytes]) -> None:
        self._conn.writelines(list(chunks))

    async def drain(self) -> None:
        if self._closed.done():
            raise ConnectionResetError("connection lost")
        if self._paused:
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        self._conn.close()

    def is_closing(self) -> bool:
        return not self._conn.is_open

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self._conn.peer_address, "sockname": self._conn.local_address,
                "connection": self._conn}.get(name, default)

    # -- fed by the handler's callbacks ----------------------------------------------------------

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def lost(self, exc: BaseException | None) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(exc or ConnectionResetError("connection lost"))
        if not self._closed.done():
            self._closed.set_result(None)


class StreamHandler(Handler):
    """Override ``handle``; it runs as a task per connection, and the connection closes
    gracefully when it returns. An exception in it is reported once and aborts that
    connection only."""

    requires_asyncio = True
    #: Bytes a reader buffers before reading from the socket pauses.
    reader_limit = 64 * 1024

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    async def handle(self, reader: StreamReader, writer: StreamWriter) -> None:
        """Serve one connection."""

    def connection_made(self, conn: Connection, first_data: memoryview | None) -> None:
        reader = StreamReader(conn, self.reader_limit)
        writer = StreamWriter(conn)
        as_layer(conn).layer = (reader, writer)  # the connection's one slot for its layer
        if first_data is not None:
            reader.feed_data(first_data)
        task = asyncio.get_running_loop().create_task(self._run(conn, reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, conn: Connection, reader: StreamReader, writer: StreamWriter) -> None:
        conn_id = conn.id
        try:
            await self.handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the peer went away: connection_closed has or will come
        except (asyncio.LimitOverrunError, ProtocolError) as exc:
            # The peer sent more than a limit allows, or broke the framing: its fault, not
            # the handler's, so one line and no traceback.
            if conn.id == conn_id and conn.is_open:
                logger.warning("closing connection %d from %s: %s", conn.id,
                               address_label(conn.peer_address),
                               exc)
                as_layer(conn).close_for(CloseReason.PROTOCOL_ERROR)
            return
        except Exception as exc:
            if conn.id == conn_id and conn.is_open:
                report_error(self, conn, exc, ErrorOrigin.CALLBACK)
                as_layer(conn).abort_for(CloseReason.HANDLER_ERROR)
            return
        if conn.id == conn_id and conn.is_open:
            conn.close()

    @staticmethod
    def _reader(conn: Connection) -> StreamReader:
        reader: StreamReader = as_layer(conn).layer[0]
        return reader

    @staticmethod
    def _writer(conn: Connection) -> StreamWriter:
        writer: StreamWriter = as_layer(conn).layer[1]
        return writer

    def data_received(self, conn: Connection, data: memoryview) -> None:
        self._reader(conn).feed_data(data)

    def eof_received(self, conn: Connection) -> None:
        self._reader(conn).feed_eof()  # the coroutine decides when to close

    def pause_writing(self, conn: Connection) -> None:
        self._writer(conn).pause()

    def resume_writing(self, conn: Connection) -> None:
        self._writer(conn).resume()

    def connection_closed(self, conn: Connection, reason: CloseReason) -> None:
        layered = as_layer(conn)
        streams: tuple[StreamReader, StreamWriter] | None = layered.layer
        if streams is None:
            return
        layered.layer = None
        reader, writer = streams
        if not reader.at_eof():
            reader.set_exception(ConnectionResetError(f"connection closed ({reason.value})"))
        writer.lost(None)
