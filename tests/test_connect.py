"""Outbound connections (``Server.connect``) on every engine, over real loopback sockets: the
callbacks, the write path, the connect deadline on both sides, failures, statistics, shutdown."""

from __future__ import annotations

import io
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import (
    WAIT,
    RecordingHandler,
    ServeFactory,
    assert_on_time,
    seconds_until_closed,
)

from portside import CloseReason, ConnectAttempt, Connection, ListenerConfig
from portside.errors import ConfigError


class Outbound(RecordingHandler):
    """Records an outbound connection's callbacks; does not echo."""

    def __init__(self) -> None:
        super().__init__()
        self.failures: list[tuple[ConnectAttempt, OSError, float]] = []
        self.user_data: dict[int, Any] = {}
        self.closed_at = 0.0

    def connection_made(self, conn: Connection, first_data: memoryview | None) -> None:
        self.user_data[conn.id] = conn.user_data
        super().connection_made(conn, first_data)

    def data_received(self, conn: Connection, data: memoryview) -> None:
        self.received.setdefault(conn.id, bytearray()).extend(data)
        self.record("data_received", conn, len(data))

    def connection_closed(self, conn: Connection, reason: CloseReason) -> None:
        self.closed_at = time.monotonic()
        super().connection_closed(conn, reason)

    def connect_failed(self, attempt: ConnectAttempt, exc: OSError) -> None:
        with self._cond:
            self.failures.append((attempt, exc, time.monotonic()))
        self.record("connect_failed", None, exc)


def on_loop(server: Any, action: Any) -> Any:
    """Run ``action`` on the server's loop and return its result."""
    done = threading.Event()
    result: list[Any] = []

    def run() -> None:
        result.append(action())
        done.set()

    server.call_soon_threadsafe(run)
    assert done.wait(WAIT)
    return result[0]


@pytest.fixture
def silent_peer() -> Iterator[tuple[socket.socket, tuple[str, int]]]:
    """A listening socket whose backlog is full and that never accepts: a connect to it
    neither succeeds nor fails (the kernel drops its SYNs) until the connect's deadline."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname(), timeout=WAIT)  # fills it
    yield listener, listener.getsockname()
    filler.close()
    listener.close()


def free_port() -> int:
    """A port nobody listens on (bound, then closed: a connect there is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_connect_round_trip(serve: ServeFactory) -> None:
    rs = serve()
    host, port = rs.address()
    client = Outbound()
    attempt = rs.server.connect(host, port, client, user_data="mine")
    client.wait(lambda: "connection_made" in client.names(), "connection_made")
    assert attempt.state == "connected" and attempt.connection is not None
    conn = attempt.connection
    assert client.made[conn.id] is None  # no first data on an outbound connection
    assert client.user_data[conn.id] == "mine"
    assert conn.peer_address[:2] == (host, port)
    on_loop(rs.server, lambda: conn.write(b"hello outbound"))
    client.wait(lambda: bytes(client.received.get(conn.id, b"")) == b"hello outbound", "echo")
    stats = rs.server.statistics().outbound[0]
    assert (stats.name, stats.active, stats.connected, stats.connecting) == ("outbound", 1, 1, 0)
    on_loop(rs.server, conn.close)
    client.wait(lambda: conn.id in client.closed, "connection_closed")
    assert client.closed[conn.id] == [CloseReason.CLOSED]
    rs.handler.wait(lambda: rs.handler.closed_count() == 1, "the accepted side closed")
    stats = rs.server.statistics().outbound[0]
    assert (stats.active, stats.closed, stats.closed_by_reason) == (0, 1, {"closed": 1})
    assert stats.bytes_out == stats.bytes_in == len(b"hello outbound")
    assert stats.connect_count == 1
    # Counted apart from the listener's figures: the listener saw one accepted connection.
    assert rs.server.statistics().listeners[0].accepted == 1
    assert not client.errors


def test_connect_unix_and_peer_half_close(serve: ServeFactory, tmp_path: Any) -> None:
    path = str(tmp_path / "echo.sock")
    rs = serve(ListenerConfig(path=path))
    client = Outbound()
    attempt = rs.server.connect_unix(path, client)
    client.wait(lambda: attempt.state == "connected", "connected")
    conn = attempt.connection
    assert conn is not None
    def write_then_half_close() -> None:
        conn.write(b"abc")
        conn.write_eof()

    on_loop(rs.server, write_then_half_close)
    # The echo server gets our FIN, echoes what it had and closes (its eof_received default).
    client.wait(lambda: conn.id in client.closed, "closed after both FINs")
    assert bytes(client.received[conn.id]) == b"abc"
    assert "eof_received" in client.names()
    assert client.closed[conn.id] == [CloseReason.CLOSED]


def test_connect_by_name_resolves_off_the_loop(serve: ServeFactory,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A name's ``getaddrinfo`` runs on a resolver thread: while it is stuck the loop still
    runs callbacks, and once it answers the attempt connects."""
    rs = serve()
    _, port = rs.address()
    real = socket.getaddrinfo
    release, asked = threading.Event(), threading.Event()
    resolved_on: list[str] = []

    def slow_resolver(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "slow.portside.test" or kwargs.get("flags", 0) & socket.AI_NUMERICHOST:
            return real(host, *args, **kwargs)
        resolved_on.append(threading.current_thread().name)
        asked.set()
        assert release.wait(WAIT), "the test never released the resolver"
        return real("127.0.0.1", *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow_resolver)
    client = Outbound()
    attempt = rs.server.connect("slow.portside.test", port, client)
    assert asked.wait(WAIT), "the name was never resolved"
    try:
        loop_thread = on_loop(rs.server, lambda: threading.current_thread().name)
        assert attempt.state == "connecting"  # the loop answered while the name was stuck
    finally:
        release.set()
    assert resolved_on and resolved_on[0] != loop_thread
    client.wait(lambda: attempt.state != "connecting", "the attempt to end")
    assert attempt.state == "connected" and attempt.connection is not None
    on_loop(rs.server, attempt.connection.close)
    client.wait(lambda: bool(client.closed), "closed")


def test_connect_refused_is_reported_and_counted(serve: ServeFactory) -> None:
    rs = serve()
    client = Outbound()
    attempt = rs.server.connect("127.0.0.1", free_port(), client)
    client.wait(lambda: bool(client.failures), "connect_failed")
    assert attempt.state == "failed"
    assert isinstance(client.failures[0][1], ConnectionRefusedError)
    assert "connection_made" not in client.names()
    stats = rs.server.statistics().outbound[0]
    assert (stats.connect_failed, stats.connect_timeouts, stats.connected) == (1, 0, 0)


def test_connect_timeout_neither_early_nor_late(serve: ServeFactory,
                                                silent_peer: Any) -> None:
    rs = serve()
    _, (host, port) = silent_peer
    client = Outbound()
    timeout = 0.8
    started = time.monotonic()
    rs.server.connect(host, port, client, timeout=timeout)
    client.wait(lambda: bool(client.failures), "connect_failed")
    _, exc, failed_at = client.failures[0]
    assert isinstance(exc, TimeoutError)
    assert_on_time(failed_at - started, timeout)
    stats = rs.server.statistics().outbound[0]
    assert (stats.connect_failed, stats.connect_timeouts, stats.connecting) == (1, 1, 0)


def test_cancel_reports_once(serve: ServeFactory, silent_peer: Any) -> None:
    rs = serve()
    _, (host, port) = silent_peer
    client = Outbound()
    attempt = rs.server.connect(host, port, client, timeout=WAIT)
    on_loop(rs.server, attempt.cancel)
    on_loop(rs.server, attempt.cancel)  # a second cancel does nothing
    client.wait(lambda: bool(client.failures), "connect_failed")
    assert len(client.failures) == 1
    assert isinstance(client.failures[0][1], ConnectionAbortedError)


def test_bad_timeout_is_refused(serve: ServeFactory) -> None:
    rs = serve()
    host, port = rs.address()
    for timeout in (0.0, -1.0, float("inf")):
        with pytest.raises(ConfigError):
            rs.server.connect(host, port, Outbound(), timeout=timeout)


def test_shutdown_closes_outbound_connections_and_fails_attempts(
        serve: ServeFactory, silent_peer: Any) -> None:
    rs = serve()
    # A peer that accepts and then says nothing: the outbound connection stays open.
    quiet = socket.socket()
    quiet.bind(("127.0.0.1", 0))
    quiet.listen(8)
    client = Outbound()
    try:
        attempt = rs.server.connect("127.0.0.1", quiet.getsockname()[1], client)
        client.wait(lambda: attempt.state == "connected", "connected")
        accepted, _ = quiet.accept()
        pending = rs.server.connect("127.0.0.1", silent_peer[1][1], client, timeout=WAIT)
        on_loop(rs.server, lambda: None)  # the loop has started the attempt by now
        assert rs.server.statistics().outbound[0].connecting == 1
        rs.stop(drain_timeout=0.2)
        assert pending.state == "failed"
        assert isinstance(pending.error, ConnectionAbortedError)
        assert attempt.connection is not None
        assert client.closed[attempt.connection.id] == [CloseReason.SHUTDOWN]
        accepted.settimeout(WAIT)
        assert accepted.recv(1) == b""  # the server's shutdown sent its FIN
        accepted.close()
    finally:
        quiet.close()


def test_outbound_backpressure(serve: ServeFactory) -> None:
    """A peer that does not read: writes queue, pause_writing past high water, reading from
    the peer pauses; once the peer reads, resume_writing and write_drained."""
    rs = serve()
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(8)
    client = Outbound()
    config = ListenerConfig(name="tight", write_high_water=64 * 1024, write_low_water=16 * 1024)
    try:
        attempt = rs.server.connect("127.0.0.1", sink.getsockname()[1], client, config=config)
        client.wait(lambda: attempt.state == "connected", "connected")
        peer, _ = sink.accept()
        conn = attempt.connection
        assert conn is not None
        chunk = b"x" * 65536
        total = 0
        while "pause_writing" not in client.names():
            on_loop(rs.server, lambda: conn.write(chunk))
            total += len(chunk)
            assert total < 64 * 1024 * 1024, "never paused"
        assert on_loop(rs.server, lambda: conn.reading_paused)
        got = 0
        peer.settimeout(WAIT)
        while got < total:
            got += len(peer.recv(1 << 20))
        client.wait(lambda: "resume_writing" in client.names(), "resume_writing")
        client.wait(lambda: "write_drained" in client.names(), "write_drained")
        assert rs.server.statistics().outbound[0].name == "tight"
        on_loop(rs.server, conn.abort)
        client.wait(lambda: conn.id in client.closed, "closed")
        peer.close()
    finally:
        sink.close()


def test_outbound_figures_reach_ctl_metrics_and_top() -> None:
    """Pure: the outbound figures, declared once, are merged over workers in the ``stats``
    document, become Prometheus families labelled by ``outbound``, and columns in ``top``."""
    import dataclasses

    from prometheus_client.parser import text_string_to_metric_families
    from rich.console import Console

    from portside.control.target import combine
    from portside.metrics import exposition
    from portside.statistics import TTFB_BUCKETS, OutboundStatistics
    from portside.top import fit, outbound_columns, render

    def entry(connected: int) -> dict[str, Any]:
        stats = OutboundStatistics(
            name="upstream", connecting=1, active=2, connected=connected, connect_failed=1,
            connect_timeouts=1, closed=3, idle_timeouts=0, write_timeouts=0, bytes_in=10,
            bytes_out=20, closed_by_reason={"closed": 3},
            connect_buckets=tuple(1 for _ in TTFB_BUCKETS), connect_sum=0.5,
            connect_count=len(TTFB_BUCKETS))
        return dataclasses.asdict(stats)

    def worker(slot: str, connected: int) -> dict[str, Any]:
        return {"process": {"slot": slot, "pid": int(slot) + 10, "state": "running",
                            "uptime": 1, "connections": 0, "loop_lag": 0, "loop_lag_max": 0,
                            "open_fds": 1, "max_fds": 2, "memory_bytes": 3, "cpu_seconds": 0},
                "engine": "epoll", "accepting_paused": False, "listeners": [],
                "outbound": [entry(connected)], "pools": {}}

    document = combine([worker("0", 3), worker("1", 4)], 1.0)
    (merged,) = document["outbound"]
    assert merged["connected"] == 7 and merged["closed_by_reason"] == {"closed": 6}
    families = {family.name: family for family in
                text_string_to_metric_families(exposition(document).decode())}
    (sample,) = families["portside_outbound_connected"].samples
    assert sample.labels == {"outbound": "upstream"} and sample.value == 7
    assert "portside_outbound_connect_seconds" in families
    assert fit(outbound_columns(1.0), [(merged, None)], 80).columns
    console = Console(width=120, record=True, file=io.StringIO())
    console.print(render(document, None, None, 1.0, width=120))
    screen = console.export_text()
    assert "upstream" in screen and re.search(r"\b7\b", screen), screen


def test_connect_unix_to_nothing_and_a_failing_callback(serve: ServeFactory,
                                                        tmp_path: Any) -> None:
    """A path nobody listens on fails at once (FileNotFoundError), reported once; an exception
    from connect_failed goes to that handler's error, and the server goes on."""
    rs = serve()

    class Raising(Outbound):
        def connect_failed(self, attempt: ConnectAttempt, exc: OSError) -> None:
            super().connect_failed(attempt, exc)
            raise RuntimeError("bug in connect_failed")

    client = Raising()
    rs.server.connect_unix(str(tmp_path / "nobody.sock"), client)
    rs.server.connect_unix(str(tmp_path / ("x" * 200)), client)  # too long for sun_path
    client.wait(lambda: len(client.errors) == 2, "both errors reported")
    assert [type(exc) for _, exc, _ in client.failures] == [FileNotFoundError, OSError]
    assert all(isinstance(exc, RuntimeError) for exc in client.errors)


# -- the per-connection policies of outbound connections: idle and write timeouts -------------


@pytest.fixture
def quiet_peer() -> Iterator[socket.socket]:
    """A listening socket the test accepts from and that never sends anything itself."""
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(8)
    yield sink
    sink.close()


def test_outbound_idle_timeout_on_both_sides(serve: ServeFactory,
                                             quiet_peer: socket.socket) -> None:
    """``config.idle_timeout`` applies to an outbound connection: closed with IDLE_TIMEOUT no
    sooner than the timeout after it connected (when nothing moves) or after its last byte,
    and not much later; counted per outbound."""
    rs = serve()
    client = Outbound()
    timeout = 0.8
    config = ListenerConfig(name="idle", idle_timeout=timeout)
    for talks in (False, True):
        started = time.monotonic()  # the deadline runs from the connect, which follows
        attempt = rs.server.connect("127.0.0.1", quiet_peer.getsockname()[1], client,
                                    config=config)
        client.wait(lambda a=attempt: a.state == "connected", "connected")  # type: ignore[misc]
        peer, _ = quiet_peer.accept()
        with peer:
            peer.settimeout(WAIT)
            if talks:
                peer.sendall(b"hello")  # a byte restarts the deadline: measured from here
                started = time.monotonic()
                client.wait(lambda: bool(client.received), "the peer's bytes")
            assert_on_time(seconds_until_closed(peer, started), timeout)
    client.wait(lambda: len(client.closed) == 2, "connection_closed")
    assert list(client.closed.values()) == [[CloseReason.IDLE_TIMEOUT]] * 2
    stats = rs.server.statistics().outbound[0]
    assert (stats.name, stats.idle_timeouts, stats.write_timeouts) == ("idle", 2, 0)


def test_outbound_write_timeout_on_both_sides(serve: ServeFactory,
                                              quiet_peer: socket.socket) -> None:
    """``config.write_timeout`` applies to an outbound connection whose peer reads nothing:
    closed with WRITE_TIMEOUT the timeout after the write stalled, not sooner, not much later."""
    rs = serve()
    client = Outbound()
    timeout = 0.8
    config = ListenerConfig(name="stuck", write_timeout=timeout, write_high_water=64 << 20,
                            write_low_water=1 << 19)
    attempt = rs.server.connect("127.0.0.1", quiet_peer.getsockname()[1], client, config=config)
    client.wait(lambda: attempt.state == "connected", "connected")
    peer, _ = quiet_peer.accept()
    with peer:
        conn = attempt.connection
        assert conn is not None

        def flood() -> float:  # queued in one write; the kernel's buffers fill in milliseconds
            conn.write(b"z" * (16 << 20))
            return time.monotonic()

        wrote = on_loop(rs.server, flood)
        client.wait(lambda: bool(client.closed), "connection_closed", timeout=WAIT)
        closed_at = [event for event in client.events if event.name == "connection_closed"]
        assert len(closed_at) == 1
    assert list(client.closed.values()) == [[CloseReason.WRITE_TIMEOUT]]
    assert_on_time(client.closed_at - wrote, timeout)
    stats = rs.server.statistics().outbound[0]
    assert (stats.name, stats.write_timeouts, stats.idle_timeouts) == ("stuck", 1, 0)
