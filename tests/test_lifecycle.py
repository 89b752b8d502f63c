"""Connection and server life cycles on every engine: each way a connection ends, graceful
shutdown, IPv6 and Unix-socket listeners, statistics and pools, loaned buffers, flow control.

Every test runs under the ``serve`` fixture, which also checks at teardown that each connection
got ``connection_closed`` exactly once and that no descriptor leaked.
"""

from __future__ import annotations

import datetime
import os
import re
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from conftest import (
    WAIT,
    Clients,
    RecordingHandler,
    RunningServer,
    ServeFactory,
    assert_on_time,
    recv_exactly,
    recv_until_eof,
    require_ipv6,
)
from proc import PortsideProcess

from portside import (
    AcceptPolicy,
    CloseReason,
    Connection,
    ListenerConfig,
    ListenError,
)

T = TypeVar("T")


# -- helpers ---------------------------------------------------------------------------------------


class CommandHandler(RecordingHandler):
    """Echoes, except for a few commands: b"close" (reply, then graceful close), b"abort"
    (abortive close) and b"boom" (the callback raises)."""

    def data_received(self, conn: Connection, data: memoryview) -> None:
        command = bytes(data)
        if command == b"close":
            self.record("command", conn, command)
            conn.write(b"bye")
            conn.close()
        elif command == b"abort":
            self.record("command", conn, command)
            conn.abort()
        elif command == b"boom":
            self.record("command", conn, command)
            raise RuntimeError("boom")
        else:
            super().data_received(conn, data)


def made_ids(handler: RecordingHandler) -> list[int]:
    return [e.conn_id for e in list(handler.events)
            if e.name == "connection_made" and e.conn_id is not None]


def connect_made(rs: RunningServer, clients: Clients, index: int = 0) -> tuple[socket.socket, int]:
    """Connect to an immediate listener and wait for its ``connection_made``; return the id."""
    before = len(made_ids(rs.handler))
    sock = clients.connect(rs.address(index))
    rs.handler.wait(lambda: len(made_ids(rs.handler)) > before, "connection_made")
    return sock, made_ids(rs.handler)[before]


def reasons_of(handler: RecordingHandler, conn_id: int) -> list[CloseReason]:
    handler.wait(lambda: conn_id in handler.closed, f"connection_closed of {conn_id}")
    return list(handler.closed[conn_id])


def events_of(handler: RecordingHandler, conn_id: int) -> list[str]:
    return [e.name for e in list(handler.events) if e.conn_id == conn_id]


def on_loop(rs: RunningServer, action: Callable[[], T]) -> T:
    """Run ``action`` on the server's loop thread and return its result (or raise its error).

    Also a barrier: whatever the loop was doing when this was called has finished."""
    outcome: list[tuple[bool, object]] = []

    def run() -> None:
        try:
            outcome.append((True, action()))
        except Exception as exc:
            outcome.append((False, exc))
        rs.handler.record("on_loop", None)

    rs.server.call_soon_threadsafe(run)
    rs.handler.wait(lambda: bool(outcome), "a callback on the loop")
    ok, value = outcome[0]
    if not ok:
        assert isinstance(value, Exception)
        raise value
    return value  # type: ignore[return-value]


def echo(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload)) == payload


def reset(sock: socket.socket) -> None:
    """Close abortively: the peer gets RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# -- 1. every way a connection ends: connection_closed exactly once, with the right reason ------


def test_handler_close_is_graceful(serve: ServeFactory, clients: Clients) -> None:
    rs = serve(ListenerConfig(), handler=CommandHandler())
    sock, conn_id = connect_made(rs, clients)
    echo(sock, b"hello")
    sock.sendall(b"close")
    assert recv_until_eof(sock) == b"bye"  # the reply is flushed before the FIN
    sock.close()
    assert reasons_of(rs.handler, conn_id) == [CloseReason.CLOSED]
    assert "connection_reset" not in rs.handler.names()


def test_handler_abort_resets_the_peer(serve: ServeFactory, clients: Clients) -> None:
    rs = serve(ListenerConfig(), handler=CommandHandler())
    sock, conn_id = connect_made(rs, clients)
    echo(sock, b"hello")
    sock.sendall(b"abort")
    with pytest.raises(ConnectionResetError):
        sock.recv(100)
    assert reasons_of(rs.handler, conn_id) == [CloseReason.ABORTED]
    assert "connection_reset" not in events_of(rs.handler, conn_id)


def test_peer_reset(serve: ServeFactory, clients: Clients) -> None:
    rs = serve(ListenerConfig())
    sock, conn_id = connect_made(rs, clients)
    echo(sock, b"hello")
    reset(sock)
    assert reasons_of(rs.handler, conn_id) == [CloseReason.RESET]
    names = events_of(rs.handler, conn_id)
    assert names.count("connection_reset") == 1
    assert names.index("connection_reset") < names.index("connection_closed")
    assert names[-1] == "connection_closed"


def test_handler_error_aborts_only_its_connection(serve: ServeFactory, clients: Clients) -> None:
    handler = CommandHandler()
    handler.expect_errors = True
    rs = serve(ListenerConfig(), handler=handler)
    doomed, doomed_id = connect_made(rs, clients)
    bystander, bystander_id = connect_made(rs, clients)
    echo(doomed, b"before")
    echo(bystander, b"before")
    doomed.sendall(b"boom")
    with pytest.raises(ConnectionResetError):
        doomed.recv(100)
    assert reasons_of(handler, doomed_id) == [CloseReason.HANDLER_ERROR]
    errors = [e for e in list(handler.events) if e.name == "error"]
    assert len(errors) == 1
    assert errors[0].conn_id == doomed_id
    assert isinstance(errors[0].detail, RuntimeError)
    assert str(errors[0].detail) == "boom"
    assert len(handler.errors) == 1
    # The other connection is unaffected.
    for round_ in range(3):
        echo(bystander, f"still here {round_}".encode())
    assert bystander_id not in handler.closed
    bystander.shutdown(socket.SHUT_WR)
    assert recv_until_eof(bystander) == b""
    assert reasons_of(handler, bystander_id) == [CloseReason.CLOSED]
    assert len(handler.errors) == 1


def test_data_first_peer_closing_before_sending(serve: ServeFactory, clients: Clients) -> None:
    rs = serve(ListenerConfig(policy=AcceptPolicy.DATA_FIRST, defer_accept=0))
    sock = clients.connect(rs.address())
    sock.close()
    rs.handler.wait(lambda: rs.handler.closed_count() == 1, "connection_closed")
    assert list(rs.handler.closed.values()) == [[CloseReason.PEER_EOF]]
    assert "connection_made" not in rs.handler.names()
    assert "eof_received" not in rs.handler.names()
    stats = on_loop(rs, rs.server.statistics).listeners[0]
    assert (stats.accepted, stats.pending, stats.active, stats.closed) == (1, 0, 0, 1)


def test_data_first_silent_peer_times_out(serve: ServeFactory, clients: Clients) -> None:
    rs = serve(ListenerConfig(policy=AcceptPolicy.DATA_FIRST, defer_accept=0,
                              first_data_timeout=0.2))
    sock = clients.connect(rs.address())
    with pytest.raises(ConnectionResetError):
        sock.recv(100)
    rs.handler.wait(lambda: rs.handler.closed_count() == 1, "connection_closed")
    assert list(rs.handler.closed.values()) == [[CloseReason.FIRST_DATA_TIMEOUT]]
    assert "connection_made" not in rs.handler.names()
    stats = on_loop(rs, rs.server.statistics).listeners[0]
    assert (stats.first_data_timeouts, stats.pending, stats.closed) == (1, 0, 1)


# -- 2. graceful shutdown --------------------------------------------------------------------------


def test_shutdown_drains_live_connections(serve: ServeFactory, clients: Clients) -> None:
    rs = serve(ListenerConfig(),
               ListenerConfig(policy=AcceptPolicy.DATA_FIRST, defer_accept=0,
                              first_data_timeout=60))
    handler = rs.handler
    active, active_id = connect_made(rs, clients, 0)
    echo(active, b"before shutdown")
    silent = clients.connect(rs.address(1))  # data-first, never sends: pending

    rs.server.shutdown(drain_timeout=5)
    handler.wait(lambda: "shutdown_started" in handler.names(), "shutdown_started")
    # The pending connection is closed at once, with FIN.
    assert recv_until_eof(silent) == b""
    silent.close()
    handler.wait(lambda: handler.closed_count() == 1, "the pending connection closed")
    ((pending_id, pending_reasons),) = handler.closed.items()
    assert pending_id != active_id
    assert pending_reasons == [CloseReason.SHUTDOWN]
    assert pending_id not in made_ids(handler)

    # Accepting has stopped: new connections are refused on every listener.
    for index in (0, 1):
        with pytest.raises(ConnectionRefusedError):
            clients.connect(rs.address(index))

    # The active connection is still served mid-conversation.
    assert rs.thread.is_alive()
    for round_ in range(3):
        echo(active, f"during drain {round_}".encode())
    active.sendall(b"last words")
    active.shutdown(socket.SHUT_WR)
    assert recv_until_eof(active) == b"last words"

    rs.thread.join(WAIT)
    assert not rs.thread.is_alive(), "server did not stop after its last connection closed"
    assert rs.server.stopped.is_set()
    assert handler.closed[active_id] == [CloseReason.CLOSED]
    names = handler.names()
    assert names.count("shutdown_started") == 1
    assert names.count("server_stopped") == 1
    assert names[-1] == "server_stopped"
    assert names.index("shutdown_started") < names.index("connection_closed")
    rs.stop()

    # After the stop as well.
    with pytest.raises(ConnectionRefusedError):
        clients.connect(rs.address(0))


def test_shutdown_drain_deadline_closes_with_fin(serve: ServeFactory, clients: Clients) -> None:
    rs = serve(ListenerConfig())
    handler = rs.handler
    sock, conn_id = connect_made(rs, clients)
    echo(sock, b"ping")
    sock.sendall(b"unread echo")  # echoed, but not read until after the shutdown
    started = time.monotonic()
    rs.server.shutdown(drain_timeout=0.8)
    handler.wait(lambda: "shutdown_started" in handler.names(), "shutdown_started")
    # The client never half-closes: the server ends the conversation at the deadline, with FIN
    # after every echoed byte (a reset would raise here).
    assert recv_until_eof(sock) == b"unread echo"
    assert_on_time(time.monotonic() - started, 0.8)
    assert conn_id not in handler.closed or handler.closed[conn_id] == [CloseReason.SHUTDOWN]
    sock.close()
    assert reasons_of(handler, conn_id) == [CloseReason.SHUTDOWN]
    rs.thread.join(WAIT)
    assert not rs.thread.is_alive()
    assert handler.names()[-1] == "server_stopped"
    assert "connection_reset" not in handler.names()


def test_shutdown_without_connections_stops_at_once(serve: ServeFactory, clients: Clients) -> None:
    rs = serve(ListenerConfig())
    address = rs.address()
    echo(clients.connect(address), b"one")
    clients.close_all()
    rs.handler.wait(lambda: rs.handler.closed_count() == 1, "connection_closed")
    rs.stop(drain_timeout=60)  # would time out if the server waited for the drain deadline
    assert rs.handler.names()[-1] == "server_stopped"
    with pytest.raises(ConnectionRefusedError):
        clients.connect(address)


# -- 3. IPv6 and Unix-socket listeners -------------------------------------------------------------


def test_ipv6_listener_echo(serve: ServeFactory, clients: Clients) -> None:
    require_ipv6()
    rs = serve(ListenerConfig(host="::1"))
    host, port = rs.address()
    assert host == "::1" and port > 0
    assert rs.server.listeners[0].address == f"[::1]:{port}"
    sock, conn_id = connect_made(rs, clients)
    echo(sock, b"over IPv6")
    sock.shutdown(socket.SHUT_WR)
    assert recv_until_eof(sock) == b""
    assert reasons_of(rs.handler, conn_id) == [CloseReason.CLOSED]


def test_unix_listener_echo_and_cleanup(
        serve: ServeFactory, clients: Clients, tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    rs = serve(ListenerConfig(path=str(path)))
    assert rs.address() == str(path)
    assert path.is_socket()
    assert rs.server.listeners[0].address == f"unix:{path}"
    sock, conn_id = connect_made(rs, clients)
    echo(sock, b"over a unix socket")
    sock.sendall(b"tail")
    sock.shutdown(socket.SHUT_WR)
    assert recv_until_eof(sock) == b"tail"
    assert reasons_of(rs.handler, conn_id) == [CloseReason.CLOSED]
    rs.stop()
    assert not path.exists(), "the socket file outlived the server"


def test_unix_listener_replaces_a_stale_socket_file(
        serve: ServeFactory, clients: Clients, tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as old:
        old.bind(str(path))  # closed without unlinking: what a crashed server leaves behind
    assert path.is_socket()
    rs = serve(ListenerConfig(path=str(path)))
    sock, conn_id = connect_made(rs, clients)
    echo(sock, b"fresh")
    sock.shutdown(socket.SHUT_WR)
    assert recv_until_eof(sock) == b""
    assert reasons_of(rs.handler, conn_id) == [CloseReason.CLOSED]
    rs.stop()
    assert not path.exists()


def test_unix_listener_refuses_a_regular_file(
        serve: ServeFactory, tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    path.write_text("not a socket")
    with pytest.raises(ListenError, match="not a socket"):
        serve(ListenerConfig(path=str(path)))
    assert path.read_text() == "not a socket"  # left alone


def test_unix_listener_refuses_a_live_socket(serve: ServeFactory, tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        other.listen(1)
        with pytest.raises(ListenError, match="another server"):
            serve(ListenerConfig(path=str(path)))
        assert path.is_socket()


# -- 4. statistics and pools -----------------------------------------------------------------------


def test_statistics_count_connections_and_bytes(serve: ServeFactory, clients: Clients) -> None:
    rs = serve(ListenerConfig())
    payloads = [b"a" * 10, b"b" * 100, b"c" * 1000]
    socks = [connect_made(rs, clients)[0] for _ in payloads]
    for sock, payload in zip(socks, payloads, strict=True):
        echo(sock, payload)

    stats = on_loop(rs, rs.server.statistics)
    listener = stats.listeners[0]
    assert stats.state == "running"
    assert (listener.accepted, listener.active, listener.pending, listener.closed) == (3, 3, 0, 0)
    assert stats.active == 3 and stats.pending == 0
    assert listener.bytes_in == listener.bytes_out == 1110
    counters = on_loop(rs, lambda: sorted(
        (c.counters().bytes_in, c.counters().bytes_out) for c in rs.server.connections()))
    assert counters == [(10, 10), (100, 100), (1000, 1000)]

    for sock in socks:
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""
    rs.handler.wait(lambda: rs.handler.closed_count() == 3, "3 closes")
    stats = on_loop(rs, rs.server.statistics)
    listener = stats.listeners[0]
    assert (listener.accepted, listener.active, listener.pending, listener.closed) == (3, 0, 0, 3)
    assert listener.bytes_in == listener.bytes_out == 1110
    assert stats.buffer_pool.hits > 0
    assert stats.buffer_pool.in_use == 0


def test_connection_objects_are_reused(serve: ServeFactory, clients: Clients) -> None:
    # No connection object made in advance: every pool hit is a recycled connection.
    rs = serve(ListenerConfig(), connection_pool_size=0)
    cycles = 50
    for i in range(cycles):
        sock = clients.connect(rs.address())
        echo(sock, f"cycle {i}".encode())
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""
        sock.close()
        done = i + 1
        rs.handler.wait(lambda: rs.handler.closed_count() == done, f"close {i}")  # noqa: B023
    stats = on_loop(rs, rs.server.statistics)
    assert len(set(made_ids(rs.handler))) == cycles  # every connection has its own id
    assert stats.listeners[0].closed == cycles
    assert stats.connection_pool.in_use == 0
    assert stats.connection_pool.hits > 0, stats.connection_pool
    assert stats.connection_pool.hits + stats.connection_pool.misses == cycles
    assert stats.buffer_pool.hits > 0


# -- 5. the buffer lent to data_received -----------------------------------------------------------


class KeepingHandler(RecordingHandler):
    """Wrongly keeps the first view it is lent, and tries to read it on the next callback."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: memoryview | None = None
        self.outcome: list[bytes | Exception] = []

    def data_received(self, conn: Connection, data: memoryview) -> None:
        if self.kept is None:
            self.kept = data
        else:
            try:
                self.outcome.append(bytes(self.kept))
            except Exception as exc:
                self.outcome.append(exc)
        super().data_received(conn, data)


def test_kept_view_is_released_after_the_callback(serve: ServeFactory, clients: Clients) -> None:
    handler = KeepingHandler()
    rs = serve(ListenerConfig(), handler=handler)
    first, _ = connect_made(rs, clients)
    second, _ = connect_made(rs, clients)
    echo(first, b"secret of the first peer")
    echo(second, b"bytes of the second peer")
    handler.wait(lambda: bool(handler.outcome), "the second callback")
    (outcome,) = handler.outcome
    assert isinstance(outcome, ValueError), f"the kept view still reads {outcome!r}"
    assert "released" in str(outcome)


class SliceKeepingHandler(KeepingHandler):
    """Keeps a slice of the first view instead of the view itself."""

    def data_received(self, conn: Connection, data: memoryview) -> None:
        if self.kept is None:
            self.kept = data[:6]
        else:
            try:
                self.outcome.append(bytes(self.kept))
            except Exception as exc:
                self.outcome.append(exc)
        RecordingHandler.data_received(self, conn, data)


def test_kept_slice_of_view_does_not_show_other_bytes(
        serve: ServeFactory, clients: Clients) -> None:
    handler = SliceKeepingHandler()
    rs = serve(ListenerConfig(), handler=handler)
    first, _ = connect_made(rs, clients)
    second, _ = connect_made(rs, clients)
    echo(first, b"secret of the first peer")
    echo(second, b"other peer's bytes")
    handler.wait(lambda: bool(handler.outcome), "the second callback")
    (outcome,) = handler.outcome
    # The pool saw the buffer still in use and dropped it: the slice keeps its own bytes.
    assert outcome == b"secret", f"the kept slice now reads {outcome!r}"
    stats = on_loop(rs, lambda: rs.server.statistics().buffer_pool)
    assert stats.discarded >= 1


# -- 6. flow control by the handler ----------------------------------------------------------------


def test_pause_and_resume_reading(serve: ServeFactory, clients: Clients) -> None:
    rs = serve(ListenerConfig())
    sock, conn_id = connect_made(rs, clients)
    echo(sock, b"before")

    def pause() -> list[bool]:
        conns = rs.server.connections()
        for conn in conns:
            conn.pause_reading()
        return [conn.reading_paused for conn in conns]

    assert on_loop(rs, pause) == [True]
    sock.sendall(b"while paused")
    # The bytes sit in the kernel: no echo, and the handler has not seen them.
    sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        sock.recv(100)
    sock.settimeout(WAIT)
    assert on_loop(rs, lambda: bytes(rs.handler.received[conn_id])) == b"before"

    def resume() -> list[bool]:
        conns = rs.server.connections()
        for conn in conns:
            conn.resume_reading()
        return [conn.reading_paused for conn in conns]

    assert on_loop(rs, resume) == [False]
    assert recv_exactly(sock, 12) == b"while paused"
    echo(sock, b"after")
    sock.shutdown(socket.SHUT_WR)
    assert recv_until_eof(sock) == b""
    assert reasons_of(rs.handler, conn_id) == [CloseReason.CLOSED]


class ClosesOnReset(RecordingHandler):
    """Calls close() from connection_reset, as a tidy handler might."""

    def connection_reset(self, conn: Connection) -> None:
        super().connection_reset(conn)
        conn.close()


def test_the_first_close_reason_wins(serve: ServeFactory, clients: Clients) -> None:
    """A close inside connection_reset is a consequence of the reset: the reason stays RESET."""
    rs = serve(ListenerConfig(), handler=ClosesOnReset())
    sock, conn_id = connect_made(rs, clients)
    echo(sock, b"hello")
    reset(sock)
    assert reasons_of(rs.handler, conn_id) == [CloseReason.RESET]


# -- a forced shutdown ends the process, whatever the counts say ---------------------------------

_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def _logged_at(line: str) -> float:
    """A log line's own timestamp, in seconds (the process's clock, not the test's)."""
    match = _LOG_TIME.search(line)
    assert match, line
    return datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _miscounted(engine: str, *options: str) -> PortsideProcess:
    proc = PortsideProcess(["serve", "handlers:Miscounted", "--listen", "127.0.0.1:0",
                            "--engine", engine, *options],
                           env={"PYTHONPATH": os.pathsep.join(sys.path)})
    proc.wait_for(r"listening on 127\.0\.0\.1:\d+")
    proc.signal(signal.SIGTERM)
    proc.wait_for(r"draining 1 connection\(s\)")  # the count is wrong: nothing is open
    return proc


def test_a_second_sigterm_ends_the_process_whatever_the_count(engine: str) -> None:
    """Issue 17, defect 0: with the count of open connections left wrong by a bug, the second
    SIGTERM logged "forcing shutdown" and the process went on for ever."""
    proc = _miscounted(engine, "--drain-timeout", "60")
    try:
        proc.signal(signal.SIGTERM)
        forcing = proc.wait_for(r"SIGTERM: forcing shutdown")
        assert proc.wait_exit() == 0
        assert proc.count("still counted open after every one was aborted") == 1
        stopped = next(line for line in proc.lines if "stopped:" in line)
        assert _logged_at(stopped) - _logged_at(forcing.string) < 0.5
    finally:
        proc.kill()


def test_the_drain_deadline_ends_the_process_whatever_the_count(engine: str) -> None:
    """The drain deadline, then the linger time, end a drain that the count says is not
    over: not sooner (the deadline holds), not much later."""
    proc = _miscounted(engine, "--drain-timeout", "0.4", "--linger-timeout", "0.4")
    try:
        draining = next(line for line in proc.lines if "draining 1" in line)
        assert proc.wait_exit() == 0
        stopped = next(line for line in proc.lines if "stopped:" in line)
        took = _logged_at(stopped) - _logged_at(draining)
        assert 0.8 - 0.02 <= took < 1.2, took
    finally:
        proc.kill()
