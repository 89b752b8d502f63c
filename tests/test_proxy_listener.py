"""PROXY-protocol listeners on every engine: the header is removed, its source becomes the
peer address, and a missing, bad or late header closes the connection and is counted. Only
trusted sources may send one: anyone else is reset at accept, counted, and logged once."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Clients,
    RecordingHandler,
    RunningServer,
    ServeFactory,
    assert_on_time,
    recv_exactly,
    recv_until_eof,
    require_ipv6,
    seconds_until_closed,
)

from portside import AcceptPolicy, CloseReason, Connection, ListenerConfig
from portside.engine.listener import _trusted
from portside.protocols.proxy import encode_v1, encode_v2

CLIENT = ("203.0.113.7", 40123)
BALANCED = ("198.51.100.1", 443)
# The tests' clients connect from 127.0.0.1: the balancer these listeners trust.
TRUST = ("127.0.0.1/32",)


@pytest.mark.parametrize("policy", [AcceptPolicy.IMMEDIATE, AcceptPolicy.DATA_FIRST])
@pytest.mark.parametrize("header", [encode_v1(CLIENT, BALANCED), encode_v2(CLIENT, BALANCED),
                                    encode_v2(CLIENT, BALANCED, {0xE1: b"x"}, checksum=True)])
def test_header_gives_the_client_address(serve: ServeFactory, clients: Clients,
                                         policy: AcceptPolicy, header: bytes) -> None:
    rs = serve(ListenerConfig(policy=policy, proxy_protocol="any",  # type: ignore[arg-type]
                              defer_accept=0, trusted_proxies=TRUST))
    sock = clients.connect(rs.address())
    # The header split over two writes, the first payload bytes right behind it.
    sock.sendall(header[:5])
    sock.sendall(header[5:] + b"hello")
    assert recv_exactly(sock, 5) == b"hello"
    conns = on_loop_connections(rs)
    assert [conn["peer"] for conn in conns] == [CLIENT]
    assert conns[0]["balancer"][0] == "127.0.0.1"
    sock.sendall(b" world")
    assert recv_exactly(sock, 6) == b" world"


def on_loop_connections(rs: RunningServer) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = []
    done = threading.Event()
    server = rs.server

    def collect() -> None:
        result.extend({"peer": conn.peer_address, "balancer": conn.balancer_address}
                      for conn in server.connections())
        done.set()

    server.call_soon_threadsafe(collect)
    assert done.wait(10)
    return result


def test_header_then_silence_on_data_first_waits_for_data(
        serve: ServeFactory, clients: Clients) -> None:
    rs = serve(ListenerConfig(policy=AcceptPolicy.DATA_FIRST, proxy_protocol="v1",  # type: ignore[arg-type]
                              defer_accept=0, first_data_timeout=0.8, trusted_proxies=TRUST))
    connected = time.monotonic()  # the deadline runs from the accept, header or not
    sock = clients.connect(rs.address())
    sock.sendall(encode_v1(CLIENT, BALANCED))
    assert_on_time(seconds_until_closed(sock, connected), 0.8)
    rs.handler.wait(lambda: rs.handler.closed_count() == 1, "the timeout")
    assert list(rs.handler.closed.values()) == [[CloseReason.FIRST_DATA_TIMEOUT]]
    assert rs.handler.made == {}


def udp_v2(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A valid v2 header whose client connection was UDP (family/transport 0x12)."""
    header = bytearray(encode_v2(source, destination))
    header[13] = 0x12
    return bytes(header)


@pytest.mark.parametrize(("accept", "sent"), [
    ("v2", b"GET / HTTP/1.0\r\n\r\n"),  # no header at all
    ("v2", encode_v1(CLIENT, BALANCED)),  # the wrong version
    ("any", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n"),  # malformed
    ("v2", udp_v2(CLIENT, BALANCED)),  # a datagram client on a stream listener
])
def test_missing_or_bad_header_is_refused_and_counted(
        serve: ServeFactory, clients: Clients, accept: str, sent: bytes) -> None:
    rs = serve(ListenerConfig(proxy_protocol=accept, trusted_proxies=TRUST))  # type: ignore[arg-type]
    sock = clients.connect(rs.address())
    sock.sendall(sent)
    assert recv_until_eof_or_reset(sock) == b""
    rs.handler.wait(lambda: rs.handler.closed_count() == 1, "the refusal")
    assert list(rs.handler.closed.values()) == [[CloseReason.PROTOCOL_ERROR]]
    assert rs.handler.made == {}
    assert rs.server.statistics().listeners[0].proxy_errors == 1


def test_silent_client_without_header_times_out(serve: ServeFactory, clients: Clients) -> None:
    rs = serve(ListenerConfig(proxy_protocol="v2", first_data_timeout=0.8,  # type: ignore[arg-type]
                              trusted_proxies=TRUST))
    connected = time.monotonic()
    sock = clients.connect(rs.address())
    assert_on_time(seconds_until_closed(sock, connected), 0.8)
    rs.handler.wait(lambda: rs.handler.closed_count() == 1, "the timeout")
    assert list(rs.handler.closed.values()) == [[CloseReason.FIRST_DATA_TIMEOUT]]


def recv_until_eof_or_reset(sock: socket.socket) -> bytes:
    try:
        return recv_until_eof(sock)
    except ConnectionResetError:
        return b""


@pytest.mark.parametrize("trusted", [(), ("10.0.0.0/8", "::1/128")])
def test_untrusted_source_is_reset_at_accept(
        serve: ServeFactory, clients: Clients, trusted: tuple[str, ...],
        caplog: pytest.LogCaptureFixture) -> None:
    """By default no TCP source is trusted; a list without 127.0.0.1 refuses it too. The
    refusal is an RST before anything is read: the handler never hears of the connection."""
    rs = serve(ListenerConfig(proxy_protocol="any", trusted_proxies=trusted))  # type: ignore[arg-type]
    refused = 3
    for _ in range(refused):
        # An RST, not a FIN, and nothing echoed. The reset can beat connect() back to user
        # space on loopback, or reach sendall() first (then recv() sees only the end after it).
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            sock = clients.connect(rs.address())
            sock.sendall(encode_v1(CLIENT, BALANCED) + b"hello")
            assert sock.recv(100) == b"", "the server answered an untrusted source"
            raise AssertionError("the connection ended with FIN, not RST")
    stats = rs.server.statistics().listeners[0]
    assert stats.proxy_refused == refused
    assert stats.closed_by_reason == {"refused": refused}
    assert stats.accepted == stats.closed == refused
    assert stats.active == stats.pending == 0
    assert rs.handler.made == {} and rs.handler.closed == {}
    lines = [r.getMessage() for r in caplog.records if "trusted_proxies" in r.getMessage()]
    assert sum("refused 127.0.0.1:" in line for line in lines) == refused  # under the burst
    if not trusted:  # said once at start, so the operator knows before the first refusal
        assert any("trusted_proxies is empty" in line for line in lines)


def test_unix_socket_peers_are_trusted(serve: ServeFactory, clients: Clients,
                                       tmp_path: Path) -> None:
    path = str(tmp_path / "proxied.sock")
    rs = serve(ListenerConfig(path=path, proxy_protocol="v2"))  # type: ignore[arg-type]
    sock = clients.connect(path)
    sock.sendall(encode_v2(CLIENT, BALANCED) + b"hello")
    assert recv_exactly(sock, 5) == b"hello"
    assert [conn["peer"] for conn in on_loop_connections(rs)] == [CLIENT]


def test_trust_by_network(serve: ServeFactory, clients: Clients) -> None:
    """A CIDR covers its hosts; an IPv4 client of an IPv6 list is not trusted by accident."""
    rs = serve(ListenerConfig(proxy_protocol="v1", trusted_proxies=("127.0.0.0/8",)),  # type: ignore[arg-type]
               ListenerConfig(proxy_protocol="v1", trusted_proxies=("::/0",)))  # type: ignore[arg-type]
    sock = clients.connect(rs.address(0))
    sock.sendall(encode_v1(CLIENT, BALANCED) + b"hi")
    assert recv_exactly(sock, 2) == b"hi"
    with pytest.raises(ConnectionResetError):
        clients.connect(rs.address(1)).recv(10)
    stats = rs.server.statistics().listeners
    assert (stats[0].proxy_refused, stats[1].proxy_refused) == (0, 1)


def test_trust_matching_without_sockets() -> None:
    """IPv4 clients of a dual-stack socket arrive as ::ffff:a.b.c.d and match IPv4 networks."""
    networks = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))
    assert _trusted(("::ffff:127.0.0.1", 5000, 0, 0), networks)
    assert _trusted(("2001:db8::7", 5000, 0, 0), networks)
    assert not _trusted(("::ffff:10.0.0.1", 5000, 0, 0), networks)
    assert not _trusted(("::1", 5000, 0, 0), networks)
    assert not _trusted("", networks)  # an unnamed Unix peer is never matched (nor checked)


def test_trusted_ipv6_balancer(serve: ServeFactory, clients: Clients) -> None:
    require_ipv6()
    rs = serve(ListenerConfig(host="::1", proxy_protocol="v2",  # type: ignore[arg-type]
                              trusted_proxies=("::1/128",)))
    sock = clients.connect(rs.address())
    sock.sendall(encode_v2(CLIENT, BALANCED) + b"over six")
    assert recv_exactly(sock, 8) == b"over six"
    assert [conn["peer"] for conn in on_loop_connections(rs)] == [CLIENT]


class Greeter(RecordingHandler):
    """Speaks first (a banner, as SMTP, POP3, FTP and MySQL servers do), naming the client;
    then echoes."""

    def connection_made(self, conn: Connection, first_data: memoryview | None) -> None:
        super().connection_made(conn, first_data)  # recorded before the client can see it
        conn.write(f"hello {conn.peer_address[0]}\n".encode())


@pytest.mark.parametrize("header", [encode_v1(CLIENT, BALANCED), encode_v2(CLIENT, BALANCED)],
                         ids=["v1", "v2"])
def test_immediate_listener_greets_right_after_the_header(
        serve: ServeFactory, clients: Clients, header: bytes) -> None:
    """Issue 17, defect 1: after a trusted balancer's header, an immediate listener's
    connection is the handler's at once; it did not hear of it until the client spoke, and a
    server-speaks-first protocol behind HAProxy's send-proxy hung, then was reset."""
    handler = Greeter()
    rs = serve(ListenerConfig(proxy_protocol="any", first_data_timeout=2.0,  # type: ignore[arg-type]
                              trusted_proxies=TRUST), handler=handler)
    sock = clients.connect(rs.address(), timeout=1.5)  # well inside first_data_timeout
    sock.sendall(header)  # and nothing else: the server speaks first
    greeting = b"hello 203.0.113.7\n"
    assert recv_exactly(sock, len(greeting)) == greeting
    assert list(handler.made.values()) == [None]
    sock.sendall(b"then the client")
    assert recv_exactly(sock, 15) == b"then the client"


@pytest.mark.parametrize("policy", [AcceptPolicy.IMMEDIATE, AcceptPolicy.DATA_FIRST])
def test_header_and_data_in_one_segment(serve: ServeFactory, clients: Clients,
                                        policy: AcceptPolicy) -> None:
    """The bytes behind the header, in the same segment, are ``first_data`` on a data-first
    listener; on an immediate one ``first_data`` is None (its documented contract) and they
    come through ``data_received``, so a handler that ignores ``first_data`` loses nothing."""
    rs = serve(ListenerConfig(policy=policy, proxy_protocol="any",  # type: ignore[arg-type]
                              defer_accept=0, trusted_proxies=TRUST))
    sock = clients.connect(rs.address())
    sock.sendall(encode_v2(CLIENT, BALANCED) + b"hello")
    assert recv_exactly(sock, 5) == b"hello"
    handler = rs.handler
    handler.wait(lambda: "data_received" in handler.names(), "the data")
    if policy is AcceptPolicy.IMMEDIATE:
        assert list(handler.made.values()) == [None]
        assert [bytes(data) for data in handler.received.values()] == [b"hello"]
    else:
        assert list(handler.made.values()) == [b"hello"]
