"""Stream integrity, property-based: whatever the chunking, every connection gets its own bytes
back, whole and in order, while other connections talk at the same time."""

from __future__ import annotations

import socket
import threading

from conftest import Clients, ServeFactory, recv_until_eof
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portside import AcceptPolicy, ListenerConfig

chunks = st.lists(st.binary(min_size=1, max_size=70_000), min_size=1, max_size=12)


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(streams=st.lists(chunks, min_size=1, max_size=6), data_first=st.booleans())
def test_concurrent_streams_echo_intact(serve: ServeFactory, clients: Clients,
                                        streams: list[list[bytes]], data_first: bool) -> None:
    # One server per test run (the fixture is per test, the examples are many).
    rs = getattr(serve, "stream_server", None)
    if rs is None:
        rs = serve(ListenerConfig(policy=AcceptPolicy.IMMEDIATE),
                   ListenerConfig(policy=AcceptPolicy.DATA_FIRST, defer_accept=0))
        serve.stream_server = rs  # type: ignore[attr-defined]
    address = rs.address(1 if data_first else 0)
    socks = [clients.connect(address) for _ in streams]
    results: list[bytes] = [b""] * len(streams)

    def talk(index: int, sock: socket.socket, stream: list[bytes]) -> None:
        for chunk in stream:
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)

    def listen(index: int, sock: socket.socket) -> None:
        results[index] = recv_until_eof(sock)

    threads = [threading.Thread(target=talk, args=(i, s, st_)) for i, (s, st_) in
               enumerate(zip(socks, streams, strict=True))]
    threads += [threading.Thread(target=listen, args=(i, s)) for i, s in enumerate(socks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == [b"".join(stream) for stream in streams]
    for sock in socks:
        sock.close()
    clients.sockets.clear()
