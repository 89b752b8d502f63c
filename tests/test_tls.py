"""TLS listeners on every engine: echo through Python's ssl and openssl s_client, ALPN and
SNI seen by the handler, and the defences: a silent TLS client meets the first-data deadline,
a garbage ClientHello is closed cleanly and counted."""

from __future__ import annotations

import logging
import os
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    WAIT,
    Clients,
    RecordingHandler,
    ServeFactory,
    assert_on_time,
    recv_until_eof,
    require_tool,
    seconds_until_closed,
)
from test_connect import on_loop

from portside import AcceptPolicy, CloseReason, Connection, ListenerConfig
from portside.examples.relay import RelayHandler, Upstream


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    require_tool("openssl")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,DNS:echo.test,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert), "-days", "2"],
                   check=True, capture_output=True, timeout=60)
    yield cert, key


def server_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    context.set_alpn_protocols(["echo/1", "http/1.1"])
    return context


def client(clients: Clients, address: tuple[str, int], certificate: tuple[Path, Path],
           server_name: str = "localhost") -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(certificate[0]))
    context.set_alpn_protocols(["echo/1"])
    raw = clients.connect(address)
    return context.wrap_socket(raw, server_hostname=server_name)


class TlsRecorder(RecordingHandler):
    def connection_made(self, conn: Connection, first_data: memoryview | None) -> None:
        tls = getattr(conn, "tls", None)
        assert tls is not None
        self.record("tls", conn, (tls.selected_alpn_protocol(), conn.tls_server_name))
        super().connection_made(conn, first_data)


@pytest.mark.parametrize("policy", [AcceptPolicy.IMMEDIATE, AcceptPolicy.DATA_FIRST])
def test_echo_over_tls(serve: ServeFactory, clients: Clients, certificate: tuple[Path, Path],
                       policy: AcceptPolicy) -> None:
    handler = TlsRecorder()
    rs = serve(ListenerConfig(policy=policy, tls=server_context(certificate), defer_accept=0),
               handler=handler)
    sock = client(clients, rs.address(), certificate, server_name="echo.test")
    payload = os.urandom(300_000)
    sock.sendall(payload[:10])
    received = b""
    while len(received) < 10:
        received += sock.recv(65536)
    sock.sendall(payload[10:])
    while len(received) < len(payload):
        received += sock.recv(65536)
    assert received == payload
    assert sock.selected_alpn_protocol() == "echo/1"
    tls_events = [event.detail for event in handler.events if event.name == "tls"]
    assert tls_events == [("echo/1", "echo.test")]
    expected_first = payload[:10] if policy is AcceptPolicy.DATA_FIRST else None
    assert list(handler.made.values()) == [expected_first]
    sock.unwrap().close()  # close_notify, then the server closes cleanly
    handler.wait(lambda: handler.closed_count() == 1, "the close")


def test_openssl_s_client_echo(serve: ServeFactory, certificate: tuple[Path, Path]) -> None:
    rs = serve(ListenerConfig(tls=server_context(certificate)))
    host, port = rs.address()
    proc = subprocess.Popen(["openssl", "s_client", "-connect", f"{host}:{port}", "-quiet",
                             "-no_ign_eof", "-servername", "localhost", "-CAfile",
                             str(certificate[0]), "-verify_return_error"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(b"hello over openssl\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], WAIT)
        assert ready, "no echo from the server"
        assert proc.stdout.readline() == b"hello over openssl\n"
        proc.stdin.close()  # EOF: s_client sends close_notify and leaves
        assert proc.wait(WAIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)


def test_silent_tls_client_meets_the_first_data_deadline(
        serve: ServeFactory, clients: Clients, certificate: tuple[Path, Path]) -> None:
    rs = serve(ListenerConfig(policy=AcceptPolicy.DATA_FIRST, tls=server_context(certificate),
                              defer_accept=0, first_data_timeout=0.8))
    connected = time.monotonic()
    sock = clients.connect(rs.address())  # TCP only: never says ClientHello
    assert_on_time(seconds_until_closed(sock, connected), 0.8)
    rs.handler.wait(lambda: rs.handler.closed_count() == 1, "the deadline")
    assert list(rs.handler.closed.values()) == [[CloseReason.FIRST_DATA_TIMEOUT]]
    assert rs.handler.made == {}


def test_garbage_client_hello_is_closed_and_counted(
        serve: ServeFactory, clients: Clients, certificate: tuple[Path, Path],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="portside")  # the command's default level
    rs = serve(ListenerConfig(tls=server_context(certificate)))
    bad = clients.connect(rs.address())
    bad.sendall(b"\x16\x03\x01\x00\x05hello, this is not TLS at all\r\n" * 4)
    try:
        data = recv_until_eof(bad)
    except ConnectionResetError:
        data = b""
    assert b"hello" not in data  # at most a TLS alert, never an echo
    rs.handler.wait(lambda: rs.handler.closed_count() == 1, "the close")
    assert list(rs.handler.closed.values()) == [[CloseReason.TLS_ERROR]]
    assert rs.server.statistics().listeners[0].tls_failures == 1
    failed = [record for record in caplog.records if "TLS handshake" in record.getMessage()]
    assert len(failed) == 1 and failed[0].levelno == logging.INFO  # seen at the default level
    good = client(clients, rs.address(), certificate)  # the server is fine
    good.sendall(b"still here")
    assert good.recv(100) == b"still here"


def test_tls_behind_proxy_protocol(serve: ServeFactory, clients: Clients,
                                   certificate: tuple[Path, Path]) -> None:
    from portside.protocols.proxy import encode_v2

    rs = serve(ListenerConfig(tls=server_context(certificate), proxy_protocol="v2",  # type: ignore[arg-type]
                              trusted_proxies=("127.0.0.1",)))
    raw = clients.connect(rs.address())
    raw.sendall(encode_v2(("192.0.2.9", 5555), ("192.0.2.1", 443)))
    context = ssl.create_default_context(cafile=str(certificate[0]))
    sock = context.wrap_socket(raw, server_hostname="localhost")
    sock.sendall(b"proxied and encrypted")
    assert sock.recv(100) == b"proxied and encrypted"


def test_tls_cli_flags(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    from proc import PortsideProcess

    bad = subprocess.run([sys.executable, "-m", "portside", "echo", "--tls-cert",
                          str(tmp_path / "x"), "--tls-key", str(tmp_path / "y")],
                         capture_output=True, text=True, timeout=WAIT)
    assert bad.returncode == 2 and "cannot load TLS certificate" in bad.stderr
    assert bad.stderr.count("\n") == 1
    proc = PortsideProcess(["echo", "--data-first-port", "0", "--immediate-port", "0",
                            "--tls-cert", str(certificate[0]), "--tls-key", str(certificate[1]),
                            "--control", str(tmp_path / "ctl")])
    try:
        port = proc.ports()["immediate"]
        context = ssl.create_default_context(cafile=str(certificate[0]))
        with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=WAIT),
                                 server_hostname="localhost") as sock:
            sock.sendall(b"cli tls")
            assert sock.recv(100) == b"cli tls"
    finally:
        proc.kill()


class CloseNotifyRecorder(RecordingHandler):
    """Records, at the peer's end of stream, whether it came with a TLS close_notify."""

    def eof_received(self, conn: Connection) -> None:
        self.record("close_notify", conn, conn.tls_close_notify_received)
        super().eof_received(conn)


def _close_notify_seen(handler: CloseNotifyRecorder) -> bool:
    handler.wait(lambda: "close_notify" in handler.names(), "the end of stream")
    return bool(next(e.detail for e in handler.events if e.name == "close_notify"))


def test_clean_tls_close_is_told_from_a_truncation(
        serve: ServeFactory, clients: Clients, certificate: tuple[Path, Path]) -> None:
    handler = CloseNotifyRecorder()
    rs = serve(ListenerConfig(tls=server_context(certificate)), handler=handler)
    sock = client(clients, rs.address(), certificate)
    sock.sendall(b"bye properly")
    assert sock.recv(100) == b"bye properly"
    raw = sock.unwrap()  # sends close_notify and waits for the server's
    assert _close_notify_seen(handler) is True
    assert recv_until_eof(raw) == b""  # then the server's FIN
    handler.wait(lambda: handler.closed_count() == 1, "the close")
    assert list(handler.closed.values()) == [[CloseReason.CLOSED]]


def test_tcp_close_without_close_notify_is_flagged(
        serve: ServeFactory, clients: Clients, certificate: tuple[Path, Path]) -> None:
    handler = CloseNotifyRecorder()
    rs = serve(ListenerConfig(tls=server_context(certificate)), handler=handler)
    sock = client(clients, rs.address(), certificate)
    sock.sendall(b"cut off")
    assert sock.recv(100) == b"cut off"
    socket.socket.shutdown(sock, socket.SHUT_WR)  # a bare TCP FIN: no close_notify first
    assert _close_notify_seen(handler) is False
    handler.wait(lambda: handler.closed_count() == 1, "the close")


class CountingRelay(RelayHandler):
    """The relay, counting each client connection's ``connection_closed`` calls."""

    def __init__(self, upstream: Upstream) -> None:
        super().__init__((upstream,), send_proxy=0, connect_timeout=WAIT)
        self.closes: dict[int, int] = {}
        self.cond = threading.Condition()

    def connection_closed(self, conn: Connection, reason: CloseReason) -> None:
        with self.cond:
            self.closes[conn.id] = self.closes.get(conn.id, 0) + 1
            self.cond.notify_all()
        super().connection_closed(conn, reason)


def test_a_tls_relay_closes_each_connection_once(
        serve: ServeFactory, certificate: tuple[Path, Path],
        caplog: pytest.LogCaptureFixture) -> None:
    """Issue 17, defect 0: the relay closes a TLS client after its upstream's FIN, when the
    client has gone (its RST came back): the close_notify's send fails and ends the
    connection inside close(). That connection was then brought back to life and closed a
    second time (accepted 2, closed 4, open -2, and a drain that never ended)."""
    caplog.set_level(logging.INFO, logger="portside")
    host, port = serve().address()  # the upstream: an echo server
    relay = CountingRelay(Upstream(host, port, None))
    rs = serve(ListenerConfig(tls=server_context(certificate)), handler=relay)
    context = ssl.create_default_context(cafile=str(certificate[0]))
    payload = os.urandom(50_000)
    for _ in range(2):
        raw = socket.create_connection(rs.address(), timeout=WAIT)
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(payload)
            received = bytearray()
            while len(received) < len(payload):
                chunk = sock.recv(65536)
                assert chunk, "the relay closed before echoing everything"
                received += chunk
            assert received == payload
        # closed without close_notify: the relay's own close_notify meets a reset
    with relay.cond:
        assert relay.cond.wait_for(lambda: len(relay.closes) == 2, WAIT), relay.closes

    def counts() -> tuple[int, int, int, int]:
        stats = rs.server.statistics().listeners[0]
        core = rs.server._core
        assert core is not None
        return stats.accepted, stats.closed, stats.pending + stats.active, core.open
    assert on_loop(rs.server, counts) == (2, 2, 0, 0)
    assert list(relay.closes.values()) == [1, 1]
    started = time.monotonic()
    rs.stop(drain_timeout=WAIT)
    assert time.monotonic() - started < 2.0  # nothing left to drain: it stops at once
    errors = [record.getMessage() for record in caplog.records
              if record.levelno >= logging.ERROR]
    assert errors == []
