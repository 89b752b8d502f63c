"""PROXY-protocol listeners on every engine: the header is removed, its source becomes the
peer address, and a missing, bad or late header closes the connection and is counted."""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest
from conftest import Clients, RunningServer, ServeFactory, recv_exactly, recv_until_eof

from portside import AcceptPolicy, CloseReason, ListenerConfig
from portside.protocols.proxy import encode_v1, encode_v2

CLIENT = ("203.0.113.7", 40123)
BALANCED = ("198.51.100.1", 443)


@pytest.mark.parametrize("policy", [AcceptPolicy.IMMEDIATE, AcceptPolicy.DATA_FIRST])
@pytest.mark.parametrize("header", [encode_v1(CLIENT, BALANCED), encode_v2(CLIENT, BALANCED),
                                    encode_v2(CLIENT, BALANCED, {0xE1: b"x"}, checksum=True)])
def test_header_gives_the_client_address(serve: ServeFactory, clients: Clients,
                                         policy: AcceptPolicy, header: bytes) -> None:
    rs = serve(ListenerConfig(policy=policy, proxy_protocol="any", defer_accept=0))  # type: ignore[arg-type]
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
                              defer_accept=0, first_data_timeout=0.3))
    sock = clients.connect(rs.address())
    sock.sendall(encode_v1(CLIENT, BALANCED))
    assert recv_until_eof_or_reset(sock) == b""
    rs.handler.wait(lambda: rs.handler.closed_count() == 1, "the timeout")
    assert list(rs.handler.closed.values()) == [[CloseReason.FIRST_DATA_TIMEOUT]]
    assert rs.handler.made == {}


@pytest.mark.parametrize(("accept", "sent"), [
    ("v2", b"GET / HTTP/1.0\r\n\r\n"),  # no header at all
    ("v2", encode_v1(CLIENT, BALANCED)),  # the wrong version
    ("any", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n"),  # malformed
])
def test_missing_or_bad_header_is_refused_and_counted(
        serve: ServeFactory, clients: Clients, accept: str, sent: bytes) -> None:
    rs = serve(ListenerConfig(proxy_protocol=accept))  # type: ignore[arg-type]
    sock = clients.connect(rs.address())
    sock.sendall(sent)
    assert recv_until_eof_or_reset(sock) == b""
    rs.handler.wait(lambda: rs.handler.closed_count() == 1, "the refusal")
    assert list(rs.handler.closed.values()) == [[CloseReason.PROTOCOL_ERROR]]
    assert rs.handler.made == {}
    assert rs.server.statistics().listeners[0].proxy_errors == 1


def test_silent_client_without_header_times_out(serve: ServeFactory, clients: Clients) -> None:
    rs = serve(ListenerConfig(proxy_protocol="v2", first_data_timeout=0.3))  # type: ignore[arg-type]
    sock = clients.connect(rs.address())
    assert recv_until_eof_or_reset(sock) == b""
    rs.handler.wait(lambda: rs.handler.closed_count() == 1, "the timeout")
    assert list(rs.handler.closed.values()) == [[CloseReason.FIRST_DATA_TIMEOUT]]


def recv_until_eof_or_reset(sock: socket.socket) -> bytes:
    try:
        return recv_until_eof(sock)
    except ConnectionResetError:
        return b""
