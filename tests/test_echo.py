"""Echo behaviour on every engine: bytes in, the same bytes out, and clean endings."""

from __future__ import annotations

import socket
import threading

from conftest import Clients, ServeFactory, join, recv_exactly, recv_until_eof

from portside import AcceptPolicy, CloseReason, ListenerConfig


def test_immediate_echo_and_half_close(serve: ServeFactory, clients: Clients) -> None:
    rs = serve(ListenerConfig(policy=AcceptPolicy.IMMEDIATE))
    sock = clients.connect(rs.address())
    rs.handler.wait(lambda: "connection_made" in rs.handler.names(), "connection_made")
    assert list(rs.handler.made.values()) == [None]
    sock.sendall(b"hello, portside")
    assert recv_exactly(sock, 15) == b"hello, portside"
    sock.sendall(b"more")
    sock.shutdown(socket.SHUT_WR)
    assert recv_until_eof(sock) == b"more"
    rs.handler.wait(lambda: rs.handler.closed_count() == 1, "connection_closed")
    assert list(rs.handler.closed.values()) == [[CloseReason.CLOSED]]
    names = rs.handler.names()
    assert names.index("eof_received") < names.index("connection_closed")


def test_data_first_delivers_first_bytes_with_connection_made(
        serve: ServeFactory, clients: Clients) -> None:
    rs = serve(ListenerConfig(policy=AcceptPolicy.DATA_FIRST, defer_accept=0))
    sock = clients.connect(rs.address())
    sock.sendall(b"first bytes")
    assert recv_exactly(sock, 11) == b"first bytes"
    assert list(rs.handler.made.values()) == [b"first bytes"]
    stats = rs.server.statistics().listeners[0]
    assert (stats.accepted, stats.active, stats.pending) == (1, 1, 0)


def test_many_connections_keep_their_own_bytes(serve: ServeFactory, clients: Clients) -> None:
    rs = serve(ListenerConfig())
    socks = [clients.connect(rs.address()) for _ in range(40)]
    for round_ in range(5):
        for i, sock in enumerate(socks):
            sock.sendall(f"{i}:{round_};".encode())
        for i, sock in enumerate(socks):
            expected = f"{i}:{round_};".encode()
            assert recv_exactly(sock, len(expected)) == expected
    for sock in socks:
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""
    rs.handler.wait(lambda: rs.handler.closed_count() == 40, "40 closes")


def test_large_transfer_is_intact(serve: ServeFactory, clients: Clients) -> None:
    rs = serve(ListenerConfig())
    sock = clients.connect(rs.address())
    payload = bytes(range(256)) * 8192  # 2 MiB: far past the socket buffers and high water

    def send_all() -> None:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send_all)
    sender.start()
    assert recv_until_eof(sock) == payload
    join(sender)
