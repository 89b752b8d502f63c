"""Outbound TLS (``Server.connect(tls=...)``) on every engine, over real loopback sockets: a
portside client to a portside TLS listener, the peer's certificate and ALPN on ``conn.tls``,
and every failure reaching ``connect_failed`` with a reason a person can act on: a
self-signed certificate, a wrong host name, a handshake that never completes (its deadline on
both sides), a refused connect, a server-side context."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import CLOCK_SLACK, WAIT, ServeFactory, require_tool
from test_connect import Outbound, free_port, on_loop

from portside import Connection, ListenerConfig
from portside.errors import ConfigError


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost, echo.test and 127.0.0.1, and its key."""
    require_tool("openssl")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,DNS:echo.test,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert), "-days", "2"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    yield make_certificate(tmp_path_factory.mktemp("tls"))


def server_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    context.set_alpn_protocols(["echo/1", "http/1.1"])
    return context


def client_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    """What a careful client uses: ssl.create_default_context, trusting our certificate."""
    context = ssl.create_default_context(cafile=str(certificate[0]))
    context.set_alpn_protocols(["echo/1"])
    return context


def subject_of(peer: Any) -> dict[str, str] | None:
    """A certificate's subject as {name: value}."""
    return {str(rdn[0][0]): str(rdn[0][1]) for rdn in peer["subject"]} if peer else None


class TlsOutbound(Outbound):
    """Records what ``conn.tls`` shows at ``connection_made``."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[int, tuple[Any, ...]] = {}

    def connection_made(self, conn: Connection, first_data: memoryview | None) -> None:
        tls = conn.tls
        assert tls is not None
        peer = tls.getpeercert()
        self.seen[conn.id] = (tls.selected_alpn_protocol(), conn.tls_server_name,
                              subject_of(peer))
        super().connection_made(conn, first_data)


@pytest.mark.parametrize("via", ["argument", "config"])
def test_tls_connect_round_trip(serve: ServeFactory, certificate: tuple[Path, Path],
                                via: str) -> None:
    rs = serve(ListenerConfig(tls=server_context(certificate)))
    port = rs.address()[1]
    client = TlsOutbound()
    context = client_context(certificate)
    if via == "argument":
        attempt = rs.server.connect("localhost", port, client, tls=context)
    else:  # the config equivalent: the outbound config's client context
        attempt = rs.server.connect("localhost", port, client,
                                    config=ListenerConfig(name="tls-out", tls=context))
    client.wait(lambda: "connection_made" in client.names(), "connection_made")
    conn = attempt.connection
    assert attempt.state == "connected" and conn is not None
    # SNI sent: the host connected to; the certificate verified and shown; ALPN agreed.
    assert client.seen[conn.id] == ("echo/1", "localhost", {"commonName": "localhost"})
    payload = b"x" * 200_000
    on_loop(rs.server, lambda: conn.write(payload))
    client.wait(lambda: len(client.received.get(conn.id, b"")) == len(payload), "the echo")
    assert bytes(client.received[conn.id]) == payload
    on_loop(rs.server, conn.close)
    client.wait(lambda: conn.id in client.closed, "connection_closed")
    assert not client.errors and not client.failures
    stats = rs.server.statistics().outbound[0]
    assert (stats.connected, stats.connect_failed, stats.closed) == (1, 0, 1)


def test_tls_connect_to_an_address_checks_the_address(serve: ServeFactory,
                                                      certificate: tuple[Path, Path]) -> None:
    rs = serve(ListenerConfig(tls=server_context(certificate)))
    host, port = rs.address()
    client = TlsOutbound()
    attempt = rs.server.connect(host, port, client, tls=client_context(certificate))
    client.wait(lambda: attempt.state != "connecting", "the handshake")
    assert attempt.state == "connected", client.failures
    conn = attempt.connection
    assert conn is not None
    on_loop(rs.server, conn.close)
    client.wait(lambda: conn.id in client.closed, "connection_closed")


def failure_of(client: Outbound) -> OSError:
    client.wait(lambda: bool(client.failures), "connect_failed")
    assert len(client.failures) == 1
    return client.failures[0][1]


def test_self_signed_certificate_fails_with_a_plain_reason(
        serve: ServeFactory, certificate: tuple[Path, Path]) -> None:
    rs = serve(ListenerConfig(tls=server_context(certificate)))
    port = rs.address()[1]
    client = TlsOutbound()
    attempt = rs.server.connect("localhost", port, client, tls=True)  # the system's CAs
    exc = failure_of(client)
    assert isinstance(exc, ssl.SSLCertVerificationError)
    assert exc.strerror == "certificate verify failed: self-signed certificate"
    assert attempt.state == "failed" and attempt.error is exc
    assert "connection_made" not in client.names() and not client.closed
    # The server saw a failed handshake (the client's alert), not a connection for its handler.
    rs.handler.wait(lambda: rs.handler.closed_count() == 1, "the server side closed")
    assert rs.handler.made == {}
    stats = rs.server.statistics().outbound[0]
    assert (stats.connected, stats.connect_failed, stats.active, stats.closed) == (0, 1, 0, 0)


def test_wrong_host_name_fails_with_a_plain_reason(serve: ServeFactory,
                                                   certificate: tuple[Path, Path]) -> None:
    rs = serve(ListenerConfig(tls=server_context(certificate)))
    host, port = rs.address()
    client = TlsOutbound()
    rs.server.connect(host, port, client, tls=client_context(certificate),
                      server_hostname="wrong.test")
    exc = failure_of(client)
    assert isinstance(exc, ssl.SSLCertVerificationError)
    assert exc.strerror == "hostname mismatch: certificate is not valid for 'wrong.test'"
    assert "connection_made" not in client.names() and not client.closed


@pytest.fixture
def mute_peer() -> Iterator[tuple[str, int]]:
    """A listener that accepts (the kernel does) and never says a word: a TLS handshake
    with it never completes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    yield listener.getsockname()
    listener.close()


def test_handshake_deadline_neither_early_nor_late(serve: ServeFactory,
                                                   certificate: tuple[Path, Path],
                                                   mute_peer: tuple[str, int]) -> None:
    rs = serve()
    client = TlsOutbound()
    timeout = 0.5
    started = time.monotonic()
    rs.server.connect(*mute_peer, client, tls=client_context(certificate), timeout=timeout)
    exc = failure_of(client)
    elapsed = client.failures[0][2] - started
    assert isinstance(exc, TimeoutError)
    assert "TLS handshake did not complete" in str(exc)
    assert elapsed >= timeout - CLOCK_SLACK, f"gave up early, after {elapsed:.3f} s"
    assert elapsed < timeout * 1.5, f"gave up late, after {elapsed:.3f} s"
    assert "connection_made" not in client.names() and not client.closed
    stats = rs.server.statistics().outbound[0]
    assert (stats.connect_timeouts, stats.connect_failed, stats.active) == (1, 1, 0)


def test_refused_tls_connect(serve: ServeFactory, certificate: tuple[Path, Path]) -> None:
    rs = serve()
    client = TlsOutbound()
    rs.server.connect("127.0.0.1", free_port(), client, tls=client_context(certificate))
    assert isinstance(failure_of(client), ConnectionRefusedError)


def test_peer_closing_during_the_handshake(serve: ServeFactory,
                                           certificate: tuple[Path, Path]) -> None:
    rs = serve()  # a plain echo server: it echoes the ClientHello, which is no ServerHello
    host, port = rs.address()
    client = TlsOutbound()
    rs.server.connect(host, port, client, tls=client_context(certificate), timeout=WAIT)
    exc = failure_of(client)
    assert isinstance(exc, (ssl.SSLError, ConnectionResetError))
    assert exc.strerror and "TLS handshake" in exc.strerror
    assert not client.closed


def test_a_server_side_context_is_refused_clearly(serve: ServeFactory,
                                                  certificate: tuple[Path, Path]) -> None:
    rs = serve()
    host, port = rs.address()
    with pytest.raises(ConfigError, match="needs a client-side TLS context"):
        rs.server.connect(host, port, TlsOutbound(), tls=server_context(certificate))
    with pytest.raises(ConfigError, match="needs a client-side TLS context"):
        rs.server.connect(host, port, TlsOutbound(),
                          config=ListenerConfig(name="wrong", tls=server_context(certificate)))
    with pytest.raises(ConfigError, match="needs server_hostname"):
        rs.server.connect_unix("/nonexistent", TlsOutbound(), tls=client_context(certificate))
