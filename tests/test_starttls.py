"""STARTTLS (``conn.start_tls``) on every engine, over real loopback sockets, with the example
line protocol (examples/starttls.py): portside client to portside server, Python's ssl client
to the server, the injection case on both sides (plaintext after the command is refused, never
read as protected), the handshake deadline on both sides, and a large transfer after the
upgrade (backpressure through TLS)."""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import CLOCK_SLACK, WAIT, Clients, ServeFactory
from test_tls_outbound import client_context, make_certificate, server_context

from portside import CloseReason, Connection, ListenerConfig
from portside.examples.starttls import StartTlsClient, StartTlsHandler


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    yield make_certificate(tmp_path_factory.mktemp("starttls"))


class Server(StartTlsHandler):
    """The example's server, recording what the tests wait on."""

    def __init__(self, context: ssl.SSLContext, handshake_timeout: float | None = None) -> None:
        super().__init__(context, handshake_timeout)
        self.closed: list[CloseReason] = []
        self.established: list[tuple[str | None, Any]] = []
        self.cond = threading.Condition()

    def tls_established(self, conn: Connection) -> None:
        assert conn.tls is not None
        with self.cond:
            self.established.append((conn.tls.version(), conn.tls_server_name))
            self.cond.notify_all()

    def connection_closed(self, conn: Connection, reason: CloseReason) -> None:
        with self.cond:
            self.closed.append(reason)
            self.cond.notify_all()

    def wait(self, predicate: Any, what: str) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, WAIT), f"timed out waiting for {what}"


class Client(StartTlsClient):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.closed: list[CloseReason] = []
        self.peer: Any = None
        self.done = threading.Event()

    def tls_established(self, conn: Connection) -> None:
        super().tls_established(conn)
        assert conn.tls is not None
        self.peer = conn.tls.getpeercert()

    def connection_closed(self, conn: Connection, reason: CloseReason) -> None:
        self.closed.append(reason)
        self.done.set()


def read_line(sock: socket.socket | ssl.SSLSocket) -> bytes:
    line = bytearray()
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise AssertionError(f"EOF after {bytes(line)!r}")
        line += chunk
    return bytes(line)


def tls_duplex(sock: ssl.SSLSocket, payload: bytes, size: int) -> bytes:
    """Send ``payload`` while reading ``size`` bytes back, from this one thread. Never
    sendall in one thread while recv runs in another on the same SSLSocket: CPython lets go
    of the GIL inside OpenSSL, which forbids using one SSL object from two threads at once;
    it fails now and then (a read that sees EOF or hangs) against any TLS server."""
    sock.setblocking(False)
    view = memoryview(payload)
    sent = 0
    got = bytearray()
    deadline = time.monotonic() + WAIT
    while len(got) < size:
        progress = False
        if sent < len(view):
            with contextlib.suppress(ssl.SSLWantWriteError, ssl.SSLWantReadError,
                                     BlockingIOError):
                sent += sock.send(view[sent:sent + 65536])
                progress = True
        try:
            chunk = sock.recv(size - len(got))
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            pass
        else:
            if not chunk:
                raise AssertionError(f"EOF after {len(got)} of {size} bytes")
            got += chunk
            progress = True
        if not progress:
            left = deadline - time.monotonic()
            assert left > 0, f"timed out after {len(got)} of {size} bytes"
            select.select([sock], [sock] if sent < len(view) else [], [], left)
    return bytes(got)


def test_portside_client_to_portside_server(serve: ServeFactory,
                                            certificate: tuple[Path, Path]) -> None:
    handler = Server(server_context(certificate))
    rs = serve(ListenerConfig(), handler=handler)
    host, port = rs.address()
    client = Client(client_context(certificate), "localhost", lines=(b"PING", b"second"))
    rs.server.connect(host, port, client)
    assert client.done.wait(WAIT), "the client did not finish"
    # Both lines were written before the handshake ended: they waited, went out encrypted
    # and were read on the TLS side of the switch.
    assert client.answers == [b"tls PING", b"tls second"]
    assert client.established and client.peer is not None
    assert client.closed == [CloseReason.CLOSED]
    handler.wait(lambda: handler.closed, "the server side closed")
    assert handler.established and handler.established[0][1] == "localhost"  # SNI seen


def test_python_ssl_client_upgrades(serve: ServeFactory, clients: Clients,
                                    certificate: tuple[Path, Path]) -> None:
    handler = Server(server_context(certificate))
    rs = serve(ListenerConfig(), handler=handler)
    raw = clients.connect(rs.address())
    assert read_line(raw) == b"READY\n"
    raw.sendall(b"hello\n")
    assert read_line(raw) == b"plain hello\n"
    raw.sendall(b"STARTTLS\n")
    assert read_line(raw) == b"GO\n"
    sock = client_context(certificate).wrap_socket(raw, server_hostname="localhost")
    # A large transfer after the upgrade: the echo goes through the write queue and its
    # water marks while the client is still sending.
    lines = [b"%06d " % i + b"y" * 500 + b"\n" for i in range(2000)]
    payload = b"".join(lines)
    expected = b"".join(b"tls " + line for line in lines)
    assert tls_duplex(sock, payload, len(expected)) == expected
    sock.close()
    handler.wait(lambda: handler.closed, "the server side closed")
    assert len(handler.established) == 1


def test_plaintext_after_starttls_is_refused_not_read_as_protected(
        serve: ServeFactory, clients: Clients, certificate: tuple[Path, Path]) -> None:
    handler = Server(server_context(certificate))
    rs = serve(ListenerConfig(), handler=handler)
    raw = clients.connect(rs.address())
    assert read_line(raw) == b"READY\n"
    raw.sendall(b"STARTTLS\nINJECTED\n")  # one packet: the classic injection
    assert read_line(raw) == b"GO\n"
    rest = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := raw.recv(4096):
            rest += chunk
    assert rest == b""  # closed: INJECTED was never answered, on either side of the switch
    handler.wait(lambda: handler.closed, "the close")
    assert handler.closed == [CloseReason.PROTOCOL_ERROR] and not handler.established


def test_client_refuses_plaintext_after_go(serve: ServeFactory,
                                           certificate: tuple[Path, Path]) -> None:
    """The other direction: a server that answers GO and more in the clear (a man in the
    middle's injected reply) does not get the client's TLS."""
    rs = serve()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    seen: list[bytes] = []

    def fake_server() -> None:
        sock, _ = listener.accept()
        with sock:
            sock.settimeout(WAIT)
            sock.sendall(b"READY\n")
            seen.append(read_line(sock))
            sock.sendall(b"GO\nplain INJECTED\n")
            with contextlib.suppress(OSError):
                while chunk := sock.recv(4096):
                    seen.append(chunk)

    thread = threading.Thread(target=fake_server, daemon=True)
    thread.start()
    client = Client(client_context(certificate), "localhost")
    try:
        host, port = listener.getsockname()
        rs.server.connect(host, port, client)
        assert client.done.wait(WAIT)
        thread.join(WAIT)
    finally:
        listener.close()
    assert seen == [b"STARTTLS\n"]  # no ClientHello, no PING
    assert client.closed == [CloseReason.PROTOCOL_ERROR] and not client.answers
    assert not client.established


@pytest.mark.parametrize("side", ["before", "after"])
def test_starttls_handshake_deadline(serve: ServeFactory, clients: Clients,
                                     certificate: tuple[Path, Path], side: str) -> None:
    timeout = 0.5
    handler = Server(server_context(certificate), handshake_timeout=timeout)
    rs = serve(ListenerConfig(), handler=handler)
    raw = clients.connect(rs.address())
    assert read_line(raw) == b"READY\n"
    raw.sendall(b"STARTTLS\n")
    assert read_line(raw) == b"GO\n"
    started = time.monotonic()
    if side == "after":  # silent: the handshake never completes
        with contextlib.suppress(ConnectionResetError):
            assert raw.recv(4096) == b""
        elapsed = time.monotonic() - started
        assert elapsed >= timeout - CLOCK_SLACK, f"reset early, after {elapsed:.3f} s"
        assert elapsed < timeout * 1.5, f"reset late, after {elapsed:.3f} s"
        handler.wait(lambda: handler.closed, "the close")
        assert handler.closed == [CloseReason.TLS_ERROR]
        assert rs.server.statistics().listeners[0].tls_failures == 1
    else:  # a handshake that finishes just inside the deadline is not cut
        raw.settimeout(WAIT)
        sock = client_context(certificate).wrap_socket(raw, server_hostname="localhost",
                                                       do_handshake_on_connect=False)
        while time.monotonic() - started < timeout * 0.8:
            with handler.cond:
                handler.cond.wait(timeout * 0.8 - (time.monotonic() - started))
        sock.do_handshake()
        handler.wait(lambda: handler.established, "tls_established")
        pause = time.monotonic() - started
        # Past the deadline now, with the handshake done: the connection lives on.
        with handler.cond:
            handler.cond.wait_for(lambda: handler.closed, timeout - pause + timeout * 0.5)
        sock.sendall(b"late\n")
        assert read_line(sock) == b"tls late\n"
        assert not handler.closed
        sock.close()


def test_stuck_tls_peer_does_not_keep_the_server_from_stopping(
        serve: ServeFactory, clients: Clients, certificate: tuple[Path, Path]) -> None:
    """A client that sends through TLS and never reads (the server's echo backs up and it
    pauses reading) is closed at the drain deadline and reset once its flush makes no progress
    for linger_timeout: shutdown ends within drain + linger, not never."""
    drain, linger = 0.3, 0.5
    handler = Server(server_context(certificate))
    rs = serve(ListenerConfig(), handler=handler, linger_timeout=linger)
    raw = clients.connect(rs.address())
    assert read_line(raw) == b"READY\n"
    raw.sendall(b"STARTTLS\n")
    assert read_line(raw) == b"GO\n"
    sock = client_context(certificate).wrap_socket(raw, server_hostname="localhost")
    handler.wait(lambda: handler.established, "tls_established")
    sock.setblocking(False)
    line = b"y" * 500 + b"\n"
    with contextlib.suppress(ssl.SSLWantWriteError, BlockingIOError):
        for _ in range(100_000):  # until the kernel buffers both ways are full (bounded)
            sock.send(line * 100)
    started = time.monotonic()
    rs.server.shutdown(drain)
    rs.thread.join(WAIT)
    elapsed = time.monotonic() - started
    assert not rs.thread.is_alive(), "server did not stop"
    assert elapsed >= drain - CLOCK_SLACK, f"stopped early, after {elapsed:.3f} s"
    assert elapsed < (drain + linger * 1.25) * 1.5, f"stopped late, after {elapsed:.3f} s"
    assert handler.closed in ([CloseReason.SHUTDOWN], [CloseReason.WRITE_TIMEOUT])
    sock.close()


class HalfClosing(Server):
    """Answers as the example does, then half-closes after ``BYE`` and keeps what comes
    after it."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(context)
        self.after_eof = bytearray()

    def data_received(self, conn: Connection, data: memoryview) -> None:
        if conn.tls is not None and conn.user_data == b"EOF":
            with self.cond:
                self.after_eof += data
                self.cond.notify_all()
            return
        super().data_received(conn, data)
        if conn.tls is not None and bytes(data) == b"BYE\n":
            conn.write_eof()
            conn.user_data = b"EOF"


def test_write_eof_on_tls_sends_close_notify_first(
        serve: ServeFactory, clients: Clients, certificate: tuple[Path, Path]) -> None:
    """write_eof on TLS: the peer sees close_notify (a clean end of our stream, not the
    truncation a bare FIN looks like), and the connection still reads."""
    handler = HalfClosing(server_context(certificate))
    rs = serve(ListenerConfig(), handler=handler)
    raw = clients.connect(rs.address())
    assert read_line(raw) == b"READY\n"
    raw.sendall(b"STARTTLS\n")
    assert read_line(raw) == b"GO\n"
    sock = client_context(certificate).wrap_socket(raw, server_hostname="localhost",
                                                   suppress_ragged_eofs=False)
    sock.sendall(b"BYE\n")
    assert read_line(sock) == b"tls BYE\n"
    assert sock.recv(4096) == b""  # close_notify; a bare FIN raises SSLEOFError here
    sock.sendall(b"still reading\n")
    handler.wait(lambda: handler.after_eof == b"still reading\n", "the bytes after write_eof")
    sock.close()
    handler.wait(lambda: handler.closed, "the close")
    assert handler.closed == [CloseReason.CLOSED]


class WritesAfterEof(HalfClosing):
    def data_received(self, conn: Connection, data: memoryview) -> None:
        super().data_received(conn, data)
        if conn.user_data == b"EOF":
            conn.write(b"too late\n")  # refused as on plain TCP: a reset, not an exception


def test_write_after_write_eof_on_tls_resets(
        serve: ServeFactory, clients: Clients, certificate: tuple[Path, Path]) -> None:
    handler = WritesAfterEof(server_context(certificate))
    rs = serve(ListenerConfig(), handler=handler)
    raw = clients.connect(rs.address())
    assert read_line(raw) == b"READY\n"
    raw.sendall(b"STARTTLS\n")
    assert read_line(raw) == b"GO\n"
    sock = client_context(certificate).wrap_socket(raw, server_hostname="localhost")
    sock.sendall(b"BYE\n")
    assert read_line(sock) == b"tls BYE\n"
    handler.wait(lambda: handler.closed, "the reset")
    assert handler.closed == [CloseReason.RESET]
    sock.close()


class WritesBeforeHandshake(Server):
    """Writes ``size`` bytes, in 1000-byte lines, right after start_tls: they wait for the
    handshake, held against write_limit."""

    def __init__(self, context: ssl.SSLContext, size: int) -> None:
        super().__init__(context)
        self.size = size

    def data_received(self, conn: Connection, data: memoryview) -> None:
        was_plain = conn.tls is None
        super().data_received(conn, data)
        if was_plain and conn.tls is not None:
            line = b"z" * 999 + b"\n"
            for _ in range(self.size // len(line)):
                conn.write(line)
            conn.write(b"z" * (self.size % len(line)))


@pytest.mark.parametrize("over", [0, 1])
def test_writes_before_the_handshake_are_held_up_to_write_limit(
        serve: ServeFactory, clients: Clients, certificate: tuple[Path, Path],
        over: int) -> None:
    """What the handler writes between start_tls and the end of the handshake waits in the
    session; up to write_limit it goes out encrypted once the handshake is done, one byte past
    it resets the connection (OUTPUT_LIMIT) as a plain write queue does."""
    limit = 64 * 1024
    handler = WritesBeforeHandshake(server_context(certificate), limit + over)
    rs = serve(ListenerConfig(write_high_water=limit, write_low_water=limit // 2,
                              write_limit=limit), handler=handler)
    raw = clients.connect(rs.address())
    assert read_line(raw) == b"READY\n"
    raw.sendall(b"STARTTLS\n")
    assert read_line(raw) == b"GO\n"
    if over:
        handler.wait(lambda: handler.closed, "the reset")
        assert handler.closed == [CloseReason.OUTPUT_LIMIT] and not handler.established
        with contextlib.suppress(ConnectionResetError):
            assert raw.recv(4096) == b""
        return
    sock = client_context(certificate).wrap_socket(raw, server_hostname="localhost")
    received = bytearray()
    while len(received) < limit:
        chunk = sock.recv(65536)
        assert chunk, f"EOF after {len(received)} of {limit} bytes"
        received += chunk
    assert len(received) == limit and received.count(b"z") == limit - limit // 1000
    assert not handler.closed
    sock.close()
