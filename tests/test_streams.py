"""The async handler style passes the echo behaviour tests of the callback style, on the
asyncio engine under stdlib asyncio and uvloop."""

from __future__ import annotations

import socket
import threading

import pytest
from conftest import (
    ENGINES,
    HAVE_UVLOOP,
    WAIT,
    Clients,
    ServeFactory,
    join,
    recv_exactly,
    recv_until_eof,
    wait_refused,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portside import (
    AcceptPolicy,
    CloseReason,
    ConfigError,
    Connection,
    Engine,
    ListenerConfig,
    Server,
    ServerConfig,
)
from portside.protocols.framing import LineFramer
from portside.streams import StreamHandler, StreamReader, StreamWriter

ASYNC_ENGINES = [engine for engine in ENGINES if engine in ("asyncio", "uvloop")]


class AsyncEcho(StreamHandler):
    """Echo written the asyncio-streams way; records how each connection ended."""

    def __init__(self) -> None:
        super().__init__()
        self.closed: list[CloseReason] = []
        self.errors: list[BaseException] = []
        self.max_buffered = 0
        self.done = threading.Condition()

    async def handle(self, reader: StreamReader, writer: StreamWriter) -> None:
        head = await reader.readexactly(4)
        if head == b"boom":
            raise RuntimeError("handler bug")
        writer.write(head)
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    def connection_closed(self, conn: Connection, reason: CloseReason) -> None:
        super().connection_closed(conn, reason)
        with self.done:
            self.closed.append(reason)
            self.done.notify_all()

    def error(self, conn: Connection | None, exc: BaseException) -> None:
        self.errors.append(exc)


class PlainEcho(AsyncEcho):
    async def handle(self, reader: StreamReader, writer: StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            self.max_buffered = max(self.max_buffered, writer.connection.write_buffer_size)
            await writer.drain()


class Shouter(AsyncEcho):
    """Line protocol through reader.messages(): each line back upper-cased."""

    async def handle(self, reader: StreamReader, writer: StreamWriter) -> None:
        async for line in reader.messages(LineFramer()):
            writer.write(bytes(line).upper() + b"\n")
            await writer.drain()
        writer.write(b"bye\n")


on_async_engines = pytest.mark.parametrize("engine", ASYNC_ENGINES)


@on_async_engines
def test_echo_and_half_close(serve: ServeFactory, clients: Clients) -> None:
    handler = PlainEcho()
    rs = serve(ListenerConfig(), handler=handler)
    sock = clients.connect(rs.address())
    sock.sendall(b"hello, async")
    assert recv_exactly(sock, 12) == b"hello, async"
    sock.sendall(b"tail")
    sock.shutdown(socket.SHUT_WR)
    assert recv_until_eof(sock) == b"tail"
    with handler.done:
        assert handler.done.wait_for(lambda: handler.closed == [CloseReason.CLOSED], WAIT)


@on_async_engines
def test_data_first_bytes_reach_the_reader(serve: ServeFactory, clients: Clients) -> None:
    rs = serve(ListenerConfig(policy=AcceptPolicy.DATA_FIRST, defer_accept=0),
               handler=PlainEcho())
    sock = clients.connect(rs.address())
    sock.sendall(b"first")
    assert recv_exactly(sock, 5) == b"first"


@on_async_engines
@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(streams=st.lists(st.lists(st.binary(min_size=1, max_size=50_000), max_size=8),
                        min_size=1, max_size=5))
def test_concurrent_streams_intact(serve: ServeFactory, clients: Clients,
                                   streams: list[list[bytes]]) -> None:
    rs = getattr(serve, "async_server", None)
    if rs is None:
        rs = serve(ListenerConfig(), handler=PlainEcho())
        serve.async_server = rs  # type: ignore[attr-defined]
    socks = [clients.connect(rs.address()) for _ in streams]
    results = [b""] * len(streams)

    def talk(sock: socket.socket, chunks: list[bytes]) -> None:
        for chunk in chunks:
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)

    def listen(index: int, sock: socket.socket) -> None:
        results[index] = recv_until_eof(sock)

    threads = [threading.Thread(target=talk, args=(s, c)) for s, c in
               zip(socks, streams, strict=True)]
    threads += [threading.Thread(target=listen, args=(i, s)) for i, s in enumerate(socks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        join(thread)
    assert results == [b"".join(chunks) for chunks in streams]
    for sock in socks:
        sock.close()
    clients.sockets.clear()


@on_async_engines
def test_drain_bounds_memory_for_a_slow_reader(serve: ServeFactory, clients: Clients) -> None:
    handler = PlainEcho()
    listener = ListenerConfig(write_high_water=64 * 1024, write_low_water=16 * 1024)
    rs = serve(listener, handler=handler)
    sock = clients.connect(rs.address())
    payload = bytes(range(256)) * 16384  # 4 MiB

    def send() -> None:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    assert recv_until_eof(sock) == payload
    join(sender)
    assert handler.max_buffered <= 64 * 1024 + 64 * 1024


@on_async_engines
def test_reader_messages_and_lines(serve: ServeFactory, clients: Clients) -> None:
    rs = serve(ListenerConfig(), handler=Shouter())
    sock = clients.connect(rs.address())
    sock.sendall(b"one\ntwo\nthr")
    sock.sendall(b"ee\n")
    sock.shutdown(socket.SHUT_WR)
    assert recv_until_eof(sock) == b"ONE\nTWO\nTHREE\nbye\n"


@on_async_engines
def test_exception_aborts_only_its_connection(serve: ServeFactory, clients: Clients) -> None:
    handler = AsyncEcho()
    rs = serve(ListenerConfig(), handler=handler)
    good, bad = clients.connect(rs.address()), clients.connect(rs.address())
    good.sendall(b"fine")
    assert recv_exactly(good, 4) == b"fine"
    bad.sendall(b"boom")
    with pytest.raises(ConnectionResetError):
        recv_until_eof(bad)
    good.sendall(b" and dandy")
    good.shutdown(socket.SHUT_WR)
    assert recv_until_eof(good) == b" and dandy"
    assert [str(exc) for exc in handler.errors] == ["handler bug"]


@on_async_engines
def test_shutdown_drains_async_connections(serve: ServeFactory, clients: Clients) -> None:
    handler = PlainEcho()
    rs = serve(ListenerConfig(), handler=handler)
    sock = clients.connect(rs.address())
    sock.sendall(b"before")
    assert recv_exactly(sock, 6) == b"before"
    rs.server.shutdown(drain_timeout=WAIT)
    wait_refused(rs.address())  # the shutdown has begun: what follows is served draining
    sock.sendall(b"during")
    assert recv_exactly(sock, 6) == b"during"
    sock.shutdown(socket.SHUT_WR)
    assert recv_until_eof(sock) == b""
    rs.thread.join(WAIT)
    assert not rs.thread.is_alive()


@pytest.mark.parametrize("engine", [Engine.EPOLL, Engine.COMPILED])
def test_epoll_engines_refuse_async_handlers(engine: Engine) -> None:
    server = Server(PlainEcho(), [ListenerConfig()], ServerConfig(engine=engine))
    with pytest.raises(ConfigError, match="asyncio or uvloop engine"):
        server.run(install_signal_handlers=False)
    for listener in server._engine_listeners:
        listener.close()


def test_auto_runs_async_handlers_on_an_asyncio_loop(clients: Clients) -> None:
    """The default engine is compiled, but a handler that runs coroutines gets uvloop (or
    stdlib asyncio) instead of an error."""
    server = Server(PlainEcho(), [ListenerConfig()])
    assert server.engine is (Engine.UVLOOP if HAVE_UVLOOP else Engine.ASYNCIO)
    thread = threading.Thread(target=server.run, kwargs={"install_signal_handlers": False})
    thread.start()
    try:
        assert server.started.wait(WAIT)
        sock = clients.connect(("127.0.0.1", server.listeners[0].port))
        sock.sendall(b"hello")
        assert recv_exactly(sock, 5) == b"hello"
    finally:
        server.shutdown(drain_timeout=0)
        join(thread)
    assert not thread.is_alive()


class Bounded(AsyncEcho):
    """Reads the ways a peer could make a reader grow: a length it chooses, or all to EOF."""

    reader_limit = 16 * 1024

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0

    async def handle(self, reader: StreamReader, writer: StreamWriter) -> None:
        mode = await reader.readexactly(1)
        if mode == b"L":  # a 4-byte length, then that many bytes
            length = int.from_bytes(await reader.readexactly(4), "big")
            writer.write(b"%d" % len(await reader.readexactly(length)))
        else:  # everything until EOF
            writer.write(b"%d" % len(await reader.read()))
        self.peak = max(self.peak, len(reader._buffer))


@on_async_engines
@pytest.mark.parametrize(("request_bytes", "answer"), [
    (b"L" + (16 * 1024).to_bytes(4, "big") + b"x" * 16 * 1024, b"16384"),  # at the limit
    (b"E" + b"y" * 10_000, b"10000"),  # to EOF, under the limit
    (b"E" + b"y" * 300_000, b"300000"),  # to EOF past the limit: unbounded, as asyncio
    (b"L" + (16 * 1024 + 1).to_bytes(4, "big") + b"x" * 100, None),  # over: closed at once
])
def test_reads_are_bounded_by_the_reader_limit(
        serve: ServeFactory, clients: Clients, caplog: pytest.LogCaptureFixture,
        request_bytes: bytes, answer: bytes | None) -> None:
    handler = Bounded()
    rs = serve(ListenerConfig(), handler=handler)
    sock = clients.connect(rs.address())
    try:
        sock.sendall(request_bytes)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the server may close before taking everything
    try:
        got: bytes | None = recv_until_eof(sock)
    except ConnectionResetError:
        got = None
    with handler.done:
        assert handler.done.wait_for(lambda: len(handler.closed) == 1, WAIT)
    if answer is not None:
        assert got == answer and handler.closed == [CloseReason.CLOSED]
    else:
        assert not got
        assert handler.closed == [CloseReason.PROTOCOL_ERROR]
        assert len([r for r in caplog.records if "reader limit" in r.getMessage()]) == 1
        assert not handler.errors  # the peer's fault: no traceback, no error callback
        stats = rs.server.statistics().listeners[0]
        assert stats.closed_by_reason.get("protocol-error") == 1
    if request_bytes[:1] == b"L":
        assert handler.peak <= 16 * 1024 + 64 * 1024  # the limit plus one socket read
