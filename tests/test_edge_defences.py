"""The core defences still hold with TLS and PROXY-protocol listeners: admission (the
ceiling), backpressure against a peer that does not read, and the first-data deadline."""

from __future__ import annotations

import contextlib
import ssl
import threading
from pathlib import Path

import pytest
from conftest import WAIT, Clients, ServeFactory, join, recv_exactly
from test_tls import certificate, client, server_context  # noqa: F401 (the fixture)

from portside import ListenerConfig
from portside.protocols.proxy import encode_v2

CLIENT = ("203.0.113.5", 1234)
FRONT = ("198.51.100.2", 80)


def test_ceiling_holds_on_a_proxy_listener(serve: ServeFactory, clients: Clients) -> None:
    rs = serve(ListenerConfig(proxy_protocol="v2", max_connections=2,  # type: ignore[arg-type]
                              trusted_proxies=("127.0.0.1",)))
    first, second = clients.connect(rs.address()), clients.connect(rs.address())
    for sock in (first, second):
        sock.sendall(encode_v2(CLIENT, FRONT) + b"hi")
        assert recv_exactly(sock, 2) == b"hi"
    third = clients.connect(rs.address())
    third.sendall(encode_v2(CLIENT, FRONT) + b"wait")
    third.settimeout(0.5)
    with pytest.raises(TimeoutError):  # in the backlog: the listener is at its ceiling
        third.recv(4)
    third.settimeout(WAIT)
    first.close()
    assert recv_exactly(third, 4) == b"wait"
    assert rs.server.statistics().listeners[0].limited >= 1


def test_backpressure_holds_under_tls(serve: ServeFactory, clients: Clients,
                                      certificate: tuple[Path, Path]) -> None:  # noqa: F811
    listener = ListenerConfig(tls=server_context(certificate), write_high_water=64 * 1024,
                              write_low_water=16 * 1024)
    rs = serve(listener)
    sock = client(clients, rs.address(), certificate)
    payload = bytes(range(256)) * 32768  # 8 MiB, sent before anything is read back
    sender = threading.Thread(target=sock.sendall, args=(payload,))
    sender.start()
    rs.handler.wait(lambda: "pause_writing" in rs.handler.names(), "backpressure")
    paused_at = [e.detail for e in rs.handler.events if e.name == "pause_writing"]
    # Queued ciphertext stops growing past high water plus one read's worth of records.
    assert max(paused_at) <= 64 * 1024 + 2 * 65536
    received = b""
    while len(received) < len(payload):
        received += sock.recv(1 << 20)
    join(sender)
    assert received == payload
    assert "resume_writing" in rs.handler.names()


def test_first_data_deadline_holds_for_a_half_done_handshake(
        serve: ServeFactory, clients: Clients, certificate: tuple[Path, Path]) -> None:  # noqa: F811
    rs = serve(ListenerConfig(tls=server_context(certificate), first_data_timeout=0.3))
    raw = clients.connect(rs.address())
    # The first bytes of a ClientHello, then silence: a slowloris inside the handshake.
    context = ssl.create_default_context(cafile=str(certificate[0]))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    hello = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        hello.do_handshake()
    raw.sendall(outgoing.read()[:20])
    with contextlib.suppress(ConnectionResetError):
        assert raw.recv(100) == b""
    rs.handler.wait(lambda: rs.handler.closed_count() == 1, "the deadline")
    assert rs.server.statistics().listeners[0].first_data_timeouts == 1
