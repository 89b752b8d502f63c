"""Regression tests for bugs a review found: each names the bug it pins down."""

from __future__ import annotations

import socket
import ssl
import struct
import threading
from pathlib import Path

import pytest
from conftest import WAIT, Clients, RecordingHandler, ServeFactory, join, recv_until_eof
from test_streams import ASYNC_ENGINES, PlainEcho
from test_tls import certificate, server_context  # noqa: F401 (the fixture)

from portside import ConfigError, Connection, ListenerConfig, Server, ServerConfig


@pytest.mark.parametrize("engine", ASYNC_ENGINES)
def test_async_read_to_eof_past_the_reader_limit(serve: ServeFactory, clients: Clients) -> None:
    """reader.read() to EOF used to hang once the buffer passed reader_limit."""

    class Upload(PlainEcho):
        async def handle(self, reader: object, writer: object) -> None:
            data = await reader.read()  # type: ignore[attr-defined]
            writer.write(len(data).to_bytes(8, "big"))  # type: ignore[attr-defined]

    rs = serve(ListenerConfig(), handler=Upload())
    sock = clients.connect(rs.address())
    sock.sendall(b"u" * 300_000)
    sock.shutdown(socket.SHUT_WR)
    assert int.from_bytes(recv_until_eof(sock), "big") == 300_000


class AbortAllAtShutdown(RecordingHandler):
    def shutdown_started(self, server: Server) -> None:
        super().shutdown_started(server)
        for conn in server.connections():
            conn.abort()


def test_shutdown_started_sees_accepting_stopped(serve: ServeFactory, clients: Clients) -> None:
    """Connections taken from the backlog at shutdown used to miss connection_closed when
    the handler closed everything in shutdown_started."""
    handler = AbortAllAtShutdown()
    rs = serve(ListenerConfig(), handler=handler)
    live = clients.connect(rs.address())
    live.sendall(b"x")
    assert live.recv(1) == b"x"
    rs.server.pause_accepting()
    waiting = [clients.connect(rs.address()) for _ in range(2)]
    for sock in waiting:
        sock.sendall(b"in the backlog")
    rs.server.shutdown()
    rs.thread.join(WAIT)
    names = handler.names()
    assert names[-1] == "server_stopped"
    assert handler.closed_count() == 3  # the live one and both from the backlog


def test_first_data_timeout_cannot_be_zero() -> None:
    """0 used to pass and then reset every data-first connection at once on epoll."""
    with pytest.raises(ConfigError, match="first_data_timeout must be a number of seconds > 0"):
        ListenerConfig(first_data_timeout=0)


def test_shutdown_asked_before_run_is_honoured() -> None:
    """A shutdown() before run() used to be dropped, and the server ran forever."""
    server = Server(RecordingHandler(), [ListenerConfig()], ServerConfig())
    server.start()
    server.shutdown()
    runner = threading.Thread(target=lambda: server.run(install_signal_handlers=False))
    runner.start()
    join(runner)
    assert not runner.is_alive()


class WritesOnReset(RecordingHandler):
    def connection_reset(self, conn: Connection) -> None:
        super().connection_reset(conn)
        conn.write(b"too late")  # fails against the reset peer: must not re-enter


def test_connection_reset_comes_once_even_if_the_handler_writes(
        serve: ServeFactory, clients: Clients) -> None:
    handler = WritesOnReset()
    rs = serve(ListenerConfig(), handler=handler)
    sock = clients.connect(rs.address())
    sock.sendall(b"hello")
    assert sock.recv(5) == b"hello"
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    handler.wait(lambda: handler.closed_count() == 1, "the close")
    assert handler.names().count("connection_reset") <= 1


def test_server_initiated_tls_close_sends_close_notify(
        serve: ServeFactory, clients: Clients, certificate: tuple[Path, Path]) -> None:  # noqa: F811
    """Closes by the server (here the idle timeout) used to send a bare FIN, which TLS
    clients report as truncation."""
    rs = serve(ListenerConfig(tls=server_context(certificate), idle_timeout=0.3))
    context = ssl.create_default_context(cafile=str(certificate[0]))
    sock = context.wrap_socket(clients.connect(rs.address()), server_hostname="localhost",
                               suppress_ragged_eofs=False)  # a bare FIN raises SSLEOFError
    sock.sendall(b"hi")
    assert sock.recv(2) == b"hi"
    try:
        assert sock.recv(100) == b""  # a clean TLS end of stream, not SSLEOFError
    except ssl.SSLEOFError:
        pytest.fail("the server closed without close_notify")
