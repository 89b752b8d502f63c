"""The relay as stunnel/hitch, on every engine: plain or TLS in, TLS out (--upstream-tls) with
the upstream's certificate verified by default, and --send-proxy still naming the client (its
header in the clear, before the ClientHello, as HAProxy sends it); and as a process, TLS in
and TLS out with a PROXY header."""

from __future__ import annotations

import contextlib
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import WAIT, Clients, RecordingHandler, ServeFactory, recv_exactly
from test_tls_outbound import client_context, make_certificate, server_context

from portside import Connection, ListenerConfig
from portside.errors import ConfigError
from portside.examples.relay import RelayHandler
from portside.protocols.proxy import Version as ProxyVersion


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    yield make_certificate(tmp_path_factory.mktemp("relay-tls"))


class Upstream(RecordingHandler):
    """A TLS echo upstream that records the PROXY header's client and the SNI it was asked."""

    def connection_made(self, conn: Connection, first_data: memoryview | None) -> None:
        proxy = conn.proxy
        self.record("seen", conn, (proxy.source if proxy else None, conn.tls_server_name,
                                   conn.tls is not None))
        super().connection_made(conn, first_data)


def tls_upstream(serve: ServeFactory, certificate: tuple[Path, Path],
                 proxy: ProxyVersion = ProxyVersion.V2) -> tuple[Upstream, int]:
    handler = Upstream()
    rs = serve(ListenerConfig(tls=server_context(certificate), proxy_protocol=proxy,
                              trusted_proxies=("127.0.0.0/8",)), handler=handler)
    return handler, rs.address()[1]


def test_tls_upstream_with_send_proxy(serve: ServeFactory, clients: Clients,
                                      certificate: tuple[Path, Path]) -> None:
    upstream, port = tls_upstream(serve, certificate)
    relay = RelayHandler(upstream=f"127.0.0.1:{port}", upstream_tls=True,
                         upstream_ca=str(certificate[0]), upstream_sni="localhost",
                         send_proxy=2, connect_timeout=WAIT)
    rs = serve(ListenerConfig(), handler=relay)
    sock = clients.connect(rs.address())
    payload = b"through TLS " * 20_000
    sock.sendall(payload[:1000])
    assert recv_exactly(sock, 1000) == payload[:1000]
    sock.sendall(payload[1000:])
    assert recv_exactly(sock, len(payload) - 1000) == payload[1000:]
    seen = [event.detail for event in upstream.events if event.name == "seen"]
    assert seen == [(sock.getsockname()[:2], "localhost", True)]
    sock.close()
    upstream.wait(lambda: upstream.closed_count() == 1, "the upstream side closed")


def test_upstream_certificate_is_verified_by_default(serve: ServeFactory, clients: Clients,
                                                     certificate: tuple[Path, Path],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    upstream, port = tls_upstream(serve, certificate, ProxyVersion.OFF)
    relay = RelayHandler(upstream=f"127.0.0.1:{port}", upstream_tls=True, retries=0,
                         connect_timeout=WAIT)  # the system's CAs: self-signed is refused
    rs = serve(ListenerConfig(), handler=relay)
    sock = clients.connect(rs.address())
    sock.sendall(b"secret")
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(100) == b""
    stats = rs.server.statistics()
    assert stats.outbound[0].connect_failed == 1 and stats.outbound[0].connected == 0
    assert any("certificate verify failed: self-signed certificate" in record.getMessage()
               for record in caplog.records)
    assert upstream.made == {}  # the handshake never finished: nothing reached the upstream


def test_relay_tls_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="upstream-ca"):
        RelayHandler(upstream="127.0.0.1:1", upstream_tls=True, upstream_ca="/nonexistent.pem")
    with pytest.raises(ConfigError, match="upstream-sni"):
        RelayHandler(upstream="unix:/tmp/x.sock", upstream_tls=True)


def test_relay_process_tls_in_tls_out_with_proxy(certificate: tuple[Path, Path]) -> None:
    """stunnel/hitch: ``portside relay`` terminating TLS and speaking TLS (and PROXY v1) to
    a ``portside echo`` that expects both."""
    from proc import PortsideProcess

    cert, key = str(certificate[0]), str(certificate[1])
    echo = PortsideProcess(["echo", "--listen", "127.0.0.1:0", "--certfile", cert,
                            "--keyfile", key, "--proxy-protocol", "v1",
                            "--trusted-proxies", "127.0.0.0/8"])
    relay: PortsideProcess | None = None
    try:
        echo_port = int(echo.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        relay = PortsideProcess(["relay", "--listen", "127.0.0.1:0", "--certfile", cert,
                                 "--keyfile", key, "--upstream", f"127.0.0.1:{echo_port}",
                                 "--upstream-tls", "--upstream-ca", cert, "--upstream-sni",
                                 "localhost", "--send-proxy", "v1"])
        port = int(relay.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        relay.wait_for(r"TLS to upstreams", seen_too=True)
        context = client_context(certificate)
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(b"stunnel-like")
            assert recv_exactly(sock, 12) == b"stunnel-like"
        relay.signal(signal.SIGTERM)
        assert relay.wait_exit() == 0
        echo.signal(signal.SIGTERM)
        assert echo.wait_exit() == 0
    finally:
        if relay is not None:
            relay.kill()
        echo.kill()


