"""The relay example (``portside relay``) on every engine, over real loopback sockets: bytes
intact both ways, half-close, slow peers on either side, upstreams that refuse, stall or die,
and the PROXY header it sends."""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import (
    WAIT,
    RunningServer,
    ServeFactory,
    assert_on_time,
    join,
    recv_exactly,
    recv_until_eof,
    start_helper,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_connect import free_port, on_loop

from portside import ListenerConfig
from portside.examples.relay import RelayHandler, Upstream, parse_upstreams
from portside.protocols.proxy import ProxyHeader, Version, parse_proxy_header

HIGH, LOW = 64 * 1024, 16 * 1024


class RawUpstream:
    """An upstream the test drives by hand: a listening socket, accepted from on demand."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(WAIT)
        self.accepted: list[socket.socket] = []

    @property
    def upstream(self) -> Upstream:
        return Upstream("127.0.0.1", self.listener.getsockname()[1], None)

    def accept(self) -> socket.socket:
        sock, _ = self.listener.accept()
        sock.settimeout(WAIT)
        self.accepted.append(sock)
        return sock

    def close(self) -> None:
        for sock in self.accepted:
            sock.close()
        self.listener.close()


@pytest.fixture
def raw_upstream() -> Iterator[RawUpstream]:
    upstream = RawUpstream()
    yield upstream
    upstream.close()


def start_relay(serve: ServeFactory, upstreams: list[Upstream], **options: Any) -> RunningServer:
    handler = RelayHandler(tuple(upstreams), send_proxy=options.pop("send_proxy", 0),
                           connect_timeout=options.pop("connect_timeout", WAIT),
                           hold_limit=options.pop("hold_limit", 64 * 1024))
    listener = ListenerConfig(write_high_water=HIGH, write_low_water=LOW)
    return serve(listener, handler=handler, **options)


def echo_upstream(serve: ServeFactory) -> Upstream:
    host, port = serve().address()
    return Upstream(host, port, None)


def relay_connections(rs: RunningServer) -> list[tuple[bool, int, bool]]:
    """(outbound?, queued bytes, reading paused) of each connection the relay holds."""
    def look() -> list[tuple[bool, int, bool]]:
        return [(conn.listener.config.name == "upstream", conn.write_buffer_size,
                 conn.reading_paused) for conn in rs.server.connections()]
    result: list[tuple[bool, int, bool]] = on_loop(rs.server, look)
    return result


def fill(sock: socket.socket, chunk: bytes, limit: int) -> int:
    """Send until the path through the relay stays full for a while (or ``limit`` bytes):
    how many bytes were sent."""
    sent = 0
    sock.setblocking(False)
    try:
        while sent < limit:
            _, writable, _ = select.select([], [sock], [], 0.5)
            if not writable:
                break  # nothing moved for half a second: every buffer on the way is full
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                continue
    finally:
        sock.settimeout(WAIT)
    return sent


def test_bytes_intact_both_ways(serve: ServeFactory, clients: Any) -> None:
    """Whatever the chunking, what the client sends comes back intact through the relay and
    an echo upstream, and the client's FIN comes back as the end of the echo."""
    rs = start_relay(serve, [echo_upstream(serve)])

    @settings(max_examples=15, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(payload=st.binary(min_size=0, max_size=300_000),
           cuts=st.lists(st.integers(min_value=1, max_value=70_000), max_size=12))
    def check(payload: bytes, cuts: list[int]) -> None:
        sock = clients.connect(rs.address())
        chunks, at = [], 0
        for cut in cuts:
            chunks.append(payload[at:at + cut])
            at += cut
        chunks.append(payload[at:])

        def send() -> None:
            for chunk in chunks:
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, name="relay-sender")
        sender.start()
        assert recv_until_eof(sock) == payload
        join(sender)
        sock.close()

    check()


def test_many_clients_at_once(serve: ServeFactory, clients: Any) -> None:
    rs = start_relay(serve, [echo_upstream(serve), echo_upstream(serve)])
    socks = [clients.connect(rs.address()) for _ in range(40)]
    for number, sock in enumerate(socks):
        sock.sendall(b"%d:" % number + bytes(range(256)) * 64)
    for number, sock in enumerate(socks):
        expected = b"%d:" % number + bytes(range(256)) * 64
        assert recv_exactly(sock, len(expected)) == expected


def test_client_half_close_reaches_upstream(serve: ServeFactory, clients: Any,
                                            raw_upstream: RawUpstream) -> None:
    start = start_relay(serve, [raw_upstream.upstream])
    sock = clients.connect(start.address())
    sock.sendall(b"request")
    sock.shutdown(socket.SHUT_WR)
    upstream = raw_upstream.accept()
    assert recv_until_eof(upstream) == b"request"  # the client's FIN arrived as a FIN
    upstream.sendall(b"a reply after the client's FIN")  # the other direction still works
    upstream.shutdown(socket.SHUT_WR)
    assert recv_until_eof(sock) == b"a reply after the client's FIN"


def test_upstream_half_close_reaches_client(serve: ServeFactory, clients: Any,
                                            raw_upstream: RawUpstream) -> None:
    rs = start_relay(serve, [raw_upstream.upstream])
    sock = clients.connect(rs.address())
    sock.sendall(b"x")
    upstream = raw_upstream.accept()
    assert recv_exactly(upstream, 1) == b"x"
    upstream.sendall(b"greeting, then FIN")
    upstream.shutdown(socket.SHUT_WR)
    assert recv_until_eof(sock) == b"greeting, then FIN"
    sock.sendall(b"the client still talks")
    sock.shutdown(socket.SHUT_WR)
    assert recv_until_eof(upstream) == b"the client still talks"
    # Both directions have ended: the relay closes both sides (the client's FIN was the last).
    deadline = time.monotonic() + WAIT
    while on_loop(rs.server, lambda: rs.server.statistics().listeners[0].active) != 0:
        assert time.monotonic() < deadline, "the relay kept the finished pair open"
        time.sleep(0.01)
    assert rs.server.statistics().outbound[0].active == 0


def test_slow_client_pauses_upstream_and_memory_stays_bounded(
        serve: ServeFactory, clients: Any, raw_upstream: RawUpstream) -> None:
    rs = start_relay(serve, [raw_upstream.upstream])
    sock = clients.connect(rs.address())
    sock.sendall(b"go")
    upstream = raw_upstream.accept()
    assert recv_exactly(upstream, 2) == b"go"
    chunk = bytes(range(256)) * 256  # 64 KiB
    sent = fill(upstream, chunk, 256 * 1024 * 1024)
    assert sent < 256 * 1024 * 1024, "the relay never pushed back"
    buffer_size = rs.server.config.buffer_size
    looks = relay_connections(rs)
    client_side = [look for look in looks if not look[0]]
    upstream_side = [look for look in looks if look[0]]
    assert client_side[0][1] <= HIGH + buffer_size, looks  # the client's queue is bounded
    assert upstream_side[0][2], "the relay still reads the upstream"
    received = recv_exactly(sock, sent)  # the client reads: everything arrives, in order
    assert received == (chunk * (sent // len(chunk) + 1))[:sent]


def test_slow_upstream_pauses_client_and_memory_stays_bounded(
        serve: ServeFactory, clients: Any, raw_upstream: RawUpstream) -> None:
    rs = start_relay(serve, [raw_upstream.upstream])
    sock = clients.connect(rs.address())
    upstream = raw_upstream.accept()
    chunk = bytes(range(255, -1, -1)) * 256
    sent = fill(sock, chunk, 256 * 1024 * 1024)
    assert sent < 256 * 1024 * 1024, "the relay never pushed back"
    buffer_size = rs.server.config.buffer_size
    looks = relay_connections(rs)
    client_side = [look for look in looks if not look[0]]
    upstream_side = [look for look in looks if look[0]]
    assert upstream_side[0][1] <= HIGH + buffer_size, looks
    assert client_side[0][2], "the relay still reads the client"
    assert recv_exactly(upstream, sent) == (chunk * (sent // len(chunk) + 1))[:sent]


def test_refusing_upstream_is_skipped(serve: ServeFactory, clients: Any) -> None:
    refused = Upstream("127.0.0.1", free_port(), None)
    rs = start_relay(serve, [refused, echo_upstream(serve)])
    for number in range(4):  # round robin starts half of them at the refusing one
        sock = clients.connect(rs.address())
        sock.sendall(b"hello %d" % number)
        assert recv_exactly(sock, 7) == b"hello %d" % number
    stats = rs.server.statistics().outbound[0]
    assert stats.name == "upstream"
    assert stats.connect_failed == 2 and stats.connected == 4


def test_all_upstreams_refuse(serve: ServeFactory, clients: Any,
                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="portside")
    rs = start_relay(serve, [Upstream("127.0.0.1", free_port(), None),
                             Upstream("127.0.0.1", free_port(), None)])
    sock = clients.connect(rs.address())
    sock.sendall(b"anyone?")
    with contextlib.suppress(ConnectionResetError):
        assert recv_until_eof(sock) == b""
    rs.stop()
    assert any("no upstream took it (4 tried" in record.getMessage()  # 1 + retries
               for record in caplog.records)


def test_stalled_upstream_is_skipped_at_the_connect_timeout(
        serve: ServeFactory, clients: Any) -> None:
    """An upstream that never answers the SYN is given up at the connect timeout (both sides:
    the first byte comes back through the next upstream no sooner and not much later), and
    meanwhile the client's bytes are held up to the hold limit, with its reading paused."""
    timeout, hold_limit = 0.8, 16 * 1024
    stalled = socket.socket()
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(0)
    filler = socket.create_connection(stalled.getsockname(), timeout=WAIT)
    try:
        rs = start_relay(serve, [Upstream("127.0.0.1", stalled.getsockname()[1], None),
                                 echo_upstream(serve)],
                         connect_timeout=timeout, hold_limit=hold_limit)
        started = time.monotonic()  # the relay dials when it accepts, after this
        sock = clients.connect(rs.address())
        payload = bytes(range(256)) * 1024  # more than the hold limit: reading pauses
        sender = start_helper(lambda: sock.sendall(payload), name="relay-sender")

        def holding() -> list[tuple[int, bool]]:
            looks: list[tuple[int, bool]] = on_loop(rs.server, lambda: [
                (len(conn.user_data.held), conn.reading_paused)
                for conn in rs.server.connections() if conn.listener.config.name != "upstream"
                and conn.user_data is not None and conn.user_data.upstream is None])
            return looks

        deadline = started + timeout / 2
        while not any(paused for _, paused in holding()):
            assert time.monotonic() < deadline, f"reading never paused: {holding()}"
            time.sleep(0.01)
        ((held, _),) = holding()
        assert hold_limit <= held <= hold_limit + rs.server.config.buffer_size, held
        first = recv_exactly(sock, 1)
        assert_on_time(time.monotonic() - started, timeout)
        assert first + recv_exactly(sock, len(payload) - 1) == payload
        join(sender)
        assert rs.server.statistics().outbound[0].connect_timeouts == 1
    finally:
        filler.close()
        stalled.close()


def test_upstream_dies_mid_stream(serve: ServeFactory, clients: Any,
                                  raw_upstream: RawUpstream) -> None:
    rs = start_relay(serve, [raw_upstream.upstream])
    sock = clients.connect(rs.address())
    sock.sendall(b"first")
    upstream = raw_upstream.accept()
    assert recv_exactly(upstream, 5) == b"first"
    upstream.sendall(b"partial")
    assert recv_exactly(sock, 7) == b"partial"
    upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    upstream.close()  # RST: the upstream died
    with pytest.raises(ConnectionResetError):  # and the client hears a reset, not an end
        sock.recv(100)
    on_loop(rs.server, lambda: None)
    assert rs.server.statistics().outbound[0].closed_by_reason.get("reset") == 1


@pytest.mark.parametrize("version", [1, 2])
def test_proxy_header_names_the_client(serve: ServeFactory, clients: Any,
                                       raw_upstream: RawUpstream, version: int) -> None:
    rs = start_relay(serve, [raw_upstream.upstream], send_proxy=version)
    sock = clients.connect(rs.address())
    sock.sendall(b"payload")
    upstream = raw_upstream.accept()
    received = bytearray()
    header: Any = None
    while not isinstance(header, ProxyHeader):
        received += upstream.recv(4096)
        header = parse_proxy_header(received, Version.ANY)
    assert header.version == version
    assert header.source == sock.getsockname()[:2]
    assert header.destination == rs.address()
    rest = bytes(received[header.length:])
    assert rest + recv_exactly(upstream, 7 - len(rest)) == b"payload"


def test_upstream_list_parsing() -> None:
    assert parse_upstreams("127.0.0.1:1, [::1]:2,unix:/tmp/x") == (
        Upstream("127.0.0.1", 1, None), Upstream("::1", 2, None), Upstream(None, 0, "/tmp/x"))
    for bad in ("", "host", "127.0.0.1:0", "data-first@127.0.0.1:5", "fd://3"):
        with pytest.raises(ValueError):
            parse_upstreams(bad)


def test_relay_command_line_bad_input_is_one_line() -> None:
    import subprocess
    import sys

    for argv in (["--upstream", "nowhere"], ["--upstream", "127.0.0.1:1", "--send-proxy", "v3"],
                 ["--upstream", "127.0.0.1:1", "--connect-timeout", "0"]):
        done = subprocess.run([sys.executable, "-m", "portside", "relay", *argv],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr



@pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["single", "workers"])
def test_portside_relay_command(workers: tuple[str, ...]) -> None:
    """``portside relay`` as a real process (and with workers, which read the relay's options
    from the environment the command sets): refusing upstream skipped, bytes relayed, SIGTERM
    ends it cleanly."""
    import signal

    from proc import PortsideProcess, echo_once

    echo = PortsideProcess(["echo", "--listen", "127.0.0.1:0"])
    relay: PortsideProcess | None = None
    try:
        echo_port = int(echo.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        relay = PortsideProcess(["relay", "--listen", "127.0.0.1:0", "--upstream",
                                 f"127.0.0.1:{free_port()},127.0.0.1:{echo_port}", *workers])
        port = int(relay.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        relay.wait_for(r"relaying to 127\.0\.0\.1:\d+, 127\.0\.0\.1:\d+", seen_too=True)
        for number in range(6):
            assert echo_once(port, b"through the relay %d" % number) == \
                b"through the relay %d" % number
        relay.signal(signal.SIGTERM)
        assert relay.wait_exit() == 0
        echo.signal(signal.SIGTERM)
        assert echo.wait_exit() == 0
    finally:
        if relay is not None:
            relay.kill()
        echo.kill()
