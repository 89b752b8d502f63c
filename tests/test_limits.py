"""Limits on every engine: the connection ceiling, paused accepting, backpressure, the data-first
timeout, eviction of stale pending connections, and surviving EMFILE in a real process.

Waiting is on conditions: a recorded callback, bytes received, or a statistics snapshot taken on
the server's own loop. The only fixed waits are negative checks ("no echo within 0.5 s"), which
can only fail if the server does something it must not.
"""

from __future__ import annotations

import random
import resource
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from conftest import (
    ALL_ENGINES,
    CLOCK_SLACK,
    WAIT,
    Clients,
    RecordingHandler,
    RunningServer,
    ServeFactory,
    assert_on_time,
    recv_exactly,
    recv_until_eof,
    require_engine,
    seconds_until_closed,
)
from proc import PortsideProcess

from portside import (
    KIB,
    AcceptPolicy,
    CloseReason,
    Connection,
    ListenerConfig,
    ListenerStatistics,
)

T = TypeVar("T")
MIB = 1024 * KIB
NEGATIVE_WAIT = 0.5  # how long "nothing happens" is watched for; only a misbehaving server fails


# -- helpers ---------------------------------------------------------------------------------------


def on_loop(rs: RunningServer, action: Callable[[], T]) -> T:
    """Run ``action`` on the server's loop and return its result.

    Loop callbacks run in the order they were scheduled, so this is also a barrier: whatever a
    thread-safe control call (``pause_accepting``...) scheduled before it has run by then."""
    done = threading.Event()
    outcome: list[T] = []
    failure: list[BaseException] = []

    def call() -> None:
        try:
            outcome.append(action())
        except BaseException as exc:
            failure.append(exc)
        finally:
            done.set()

    rs.server.call_soon_threadsafe(call)
    assert done.wait(WAIT), "the server's loop did not run a callback"
    if failure:
        raise failure[0]
    return outcome[0]


def listener_stats(rs: RunningServer, index: int = 0) -> ListenerStatistics:
    """A snapshot of one listener's counters, taken on the loop thread."""
    return on_loop(rs, lambda: rs.server.statistics().listeners[index])


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Re-check a condition nothing notifies about (e.g. the server's counters) until it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def echo_round_trip(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload)) == payload


def assert_no_data(sock: socket.socket, within: float = NEGATIVE_WAIT) -> None:
    """Nothing arrives on ``sock`` for ``within`` seconds (and it is not closed either)."""
    previous = sock.gettimeout()
    sock.settimeout(within)
    try:
        data = sock.recv(1)
    except TimeoutError:
        return
    finally:
        sock.settimeout(previous)
    raise AssertionError(f"expected no data yet, got {data!r}")


def count_made(handler: RecordingHandler) -> int:
    return handler.names().count("connection_made")


def reasons_of(handler: RecordingHandler) -> list[CloseReason]:
    """Every close reason recorded so far, in order."""
    return [event.detail for event in list(handler.events) if event.name == "connection_closed"]


# -- 1. max_connections ----------------------------------------------------------------------------


def test_max_connections_holds_the_next_client_in_the_backlog(
        serve: ServeFactory, clients: Clients) -> None:
    rs = serve(ListenerConfig(max_connections=3))
    handler = rs.handler
    assert listener_stats(rs).accepting

    served = [clients.connect(rs.address()) for _ in range(3)]
    for i, sock in enumerate(served):
        echo_round_trip(sock, f"served {i}".encode())
    stats = listener_stats(rs)
    assert (stats.active, stats.pending) == (3, 0)
    assert stats.limited >= 1
    assert not stats.accepting

    waiting = clients.connect(rs.address())  # the kernel completes it; it waits in the backlog
    waiting.sendall(b"let me in")
    assert_no_data(waiting)
    assert count_made(handler) == 3
    assert listener_stats(rs).accepted == 3

    served[0].close()
    handler.wait(lambda: count_made(handler) == 4, "the waiting client to be accepted")
    assert recv_exactly(waiting, 9) == b"let me in"
    echo_round_trip(served[1], b"still here")
    stats = listener_stats(rs)
    assert (stats.accepted, stats.active) == (4, 3)
    assert not stats.accepting  # back at the ceiling with the newcomer

    served[1].close()
    handler.wait(lambda: handler.closed_count() == 2, "two connections to close")
    stats = listener_stats(rs)
    assert stats.active == 2
    assert stats.accepting  # below the ceiling again
    assert stats.limited >= 1
    assert reasons_of(handler) == [CloseReason.CLOSED, CloseReason.CLOSED]


# -- 2. pause_accepting / resume_accepting ---------------------------------------------------------


def test_pause_and_resume_accepting(serve: ServeFactory, clients: Clients) -> None:
    rs = serve(ListenerConfig())
    handler = rs.handler
    existing = clients.connect(rs.address())
    echo_round_trip(existing, b"before pause")

    rs.server.pause_accepting()  # from this (non-loop) thread
    stats = on_loop(rs, rs.server.statistics)  # runs after the pause took effect
    assert stats.accepting_paused
    assert not stats.listeners[0].accepting

    newcomer = clients.connect(rs.address())
    newcomer.sendall(b"hello?")
    assert_no_data(newcomer)
    assert count_made(handler) == 1
    echo_round_trip(existing, b"existing connections keep being served")
    assert count_made(handler) == 1

    rs.server.resume_accepting()
    assert recv_exactly(newcomer, 6) == b"hello?"
    assert count_made(handler) == 2
    stats = on_loop(rs, rs.server.statistics)
    assert not stats.accepting_paused
    assert stats.listeners[0].accepting
    assert stats.listeners[0].accepted == 2
    echo_round_trip(existing, b"after resume")


# -- 3. backpressure against a peer that does not read ---------------------------------------------


class BoundedWriteHandler(RecordingHandler):
    """Records the largest write queue any connection reached, and reads made while paused."""

    def __init__(self) -> None:
        super().__init__()
        self.max_buffered = 0
        self.reads_while_paused = 0

    def data_received(self, conn: Connection, data: memoryview) -> None:
        if conn.reading_paused:
            self.reads_while_paused += 1
        super().data_received(conn, data)
        self.max_buffered = max(self.max_buffered, conn.write_buffer_size)


def test_backpressure_bounds_the_write_queue_of_a_non_reading_peer(
        serve: ServeFactory, clients: Clients) -> None:
    high, low, buffer_size = 128 * KIB, 32 * KIB, 64 * KIB
    handler = BoundedWriteHandler()
    rs = serve(ListenerConfig(write_high_water=high, write_low_water=low),
               handler=handler, buffer_size=buffer_size)
    payload = random.Random(20240611).randbytes(16 * 1024 * KIB)

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    clients.sockets.append(sock)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KIB)  # fill up quickly
    sock.settimeout(3 * WAIT)  # also bounds the sender's sendall as a whole
    sock.connect(rs.address())
    handler.wait(lambda: "connection_made" in handler.names(), "connection_made")

    send_failure: list[BaseException] = []

    def send_all() -> None:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except BaseException as exc:
            send_failure.append(exc)

    sender = threading.Thread(target=send_all, name="limits-test-sender", daemon=True)
    sender.start()
    try:
        handler.wait(lambda: "pause_writing" in handler.names(), "pause_writing")
        # The peer still reads nothing for a while; the queue must stay bounded meanwhile (the
        # maximum is tracked on every read, so this window is covered by the check below).
        sender.join(NEGATIVE_WAIT)
        assert "resume_writing" not in handler.names()
        assert 0 < handler.max_buffered <= high + buffer_size
        assert len(handler.received.get(next(iter(handler.made)), b"")) < len(payload)

        received = recv_until_eof(sock)  # now read everything
    finally:
        sender.join(3 * WAIT)
    assert not sender.is_alive()
    assert not send_failure, send_failure
    assert len(received) == len(payload)
    assert received == payload  # intact and in order

    handler.wait(lambda: handler.closed_count() == 1, "connection_closed")
    events = [event for event in handler.events
              if event.name in ("pause_writing", "resume_writing")]
    assert events[0].name == "pause_writing"
    assert "resume_writing" in [event.name for event in events]
    for event in events:
        if event.name == "pause_writing":
            assert high < event.detail <= high + buffer_size, event
        else:
            assert event.detail <= low, event
    assert handler.max_buffered <= high + buffer_size
    assert handler.reads_while_paused == 0
    stats = listener_stats(rs)
    assert stats.bytes_in == stats.bytes_out == len(payload)
    assert list(handler.closed.values()) == [[CloseReason.CLOSED]]


# -- 4. the data-first first-data timeout ----------------------------------------------------------


def test_data_first_closes_a_silent_client_after_first_data_timeout(
        serve: ServeFactory, clients: Clients) -> None:
    timeout = 0.8
    rs = serve(ListenerConfig(policy=AcceptPolicy.DATA_FIRST, defer_accept=0,
                              first_data_timeout=timeout))
    handler = rs.handler
    connected = time.monotonic()
    silent = clients.connect(rs.address())
    talker = clients.connect(rs.address())
    echo_round_trip(talker, b"within the window")

    # Both sides of the deadline: not before it (the server accepted after connect returned),
    # and not long after it.
    assert_on_time(seconds_until_closed(silent, connected), timeout)
    handler.wait(lambda: CloseReason.FIRST_DATA_TIMEOUT in reasons_of(handler),
                 "the silent connection to time out")

    assert len(handler.made) == 1  # only the talker was ever handed to the handler
    assert list(handler.made.values()) == [b"within the window"]
    silent_ids = [conn_id for conn_id in handler.closed if conn_id not in handler.made]
    assert len(silent_ids) == 1
    assert handler.closed[silent_ids[0]] == [CloseReason.FIRST_DATA_TIMEOUT]
    echo_round_trip(talker, b"and still served after the timeout")
    stats = listener_stats(rs)
    assert stats.first_data_timeouts == 1
    assert (stats.accepted, stats.active, stats.pending, stats.closed) == (2, 1, 0, 1)


def test_first_data_deadline_with_the_default_defer_accept(
        serve: ServeFactory, clients: Clients) -> None:
    """With TCP_DEFER_ACCEPT on (the default), the kernel holds a silent connection for about
    defer_accept seconds before portside sees it; the first-data deadline runs after that,
    so the silent client is closed no sooner than first_data_timeout, and a talker is served
    at once with its first bytes."""
    config = ListenerConfig(policy=AcceptPolicy.DATA_FIRST, first_data_timeout=0.5)
    assert config.defer_accept > 0
    rs = serve(config)
    connected = time.monotonic()
    silent = clients.connect(rs.address())
    talker = clients.connect(rs.address())
    echo_round_trip(talker, b"first bytes")
    assert list(rs.handler.made.values()) == [b"first bytes"]
    elapsed = seconds_until_closed(silent, connected)
    assert config.first_data_timeout - CLOCK_SLACK <= elapsed < WAIT, elapsed
    rs.handler.wait(lambda: CloseReason.FIRST_DATA_TIMEOUT in reasons_of(rs.handler),
                    "the first-data timeout")
    assert listener_stats(rs).first_data_timeouts == 1


# -- 5. a flood of silent connections cannot lock real clients out ---------------------------------


def test_stale_pending_connections_are_evicted_for_a_real_client(
        serve: ServeFactory, clients: Clients) -> None:
    """At the ceiling, a real client waits until the silent ones have been pending for
    ``stale_pending_age`` (both sides, measured from the flood's first connect), and then gets
    their place: the evicted ones are closed on the client side too."""
    flood, age = 20, 0.8
    rs = serve(ListenerConfig(policy=AcceptPolicy.DATA_FIRST, defer_accept=0,
                              max_connections=flood, stale_pending_age=age,
                              first_data_timeout=30))
    handler = rs.handler
    flooded = time.monotonic()
    silent = [clients.connect(rs.address()) for _ in range(flood)]
    wait_until(lambda: listener_stats(rs).pending == flood, f"{flood} pending connections")
    assert listener_stats(rs).limited >= 1

    real = clients.connect(rs.address())
    real.sendall(b"a real request")
    assert recv_exactly(real, 14) == b"a real request"
    assert_on_time(time.monotonic() - flooded, age)

    assert list(handler.made.values()) == [b"a real request"]
    stats = listener_stats(rs)
    assert stats.evicted > 0
    assert stats.first_data_timeouts == 0
    assert stats.active == 1
    evicted = [reason for reason in reasons_of(handler) if reason is CloseReason.EVICTED]
    assert len(evicted) == stats.evicted
    for sock in silent:  # each evicted one was reset; the others are still open
        sock.setblocking(False)
    closed = 0
    for sock in silent:
        try:
            closed += sock.recv(1) == b""
        except ConnectionResetError:
            closed += 1
        except BlockingIOError:
            pass
    assert closed == stats.evicted


# -- 6. EMFILE: a real process with a low descriptor limit -----------------------------------------


FD_LIMIT = 40


def _limit_descriptors() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, hard))


@pytest.mark.parametrize("engine", ALL_ENGINES)
def test_echo_process_survives_running_out_of_descriptors(tmp_path: Path, engine: str) -> None:
    """On every engine: each drives the accept loop's capacity-error back-off its own way
    (the compiled engine's accept is in _compiled.pyx; asyncio and uvloop call it from their
    loop's readiness callbacks)."""
    require_engine(engine)
    log = PortsideProcess(["echo", "--host", "127.0.0.1", "--data-first-port", "0",
                           "--immediate-port", "0", "--log-level", "info", "--defer-accept", "0",
                           "--control", str(tmp_path / "ctl"), "--engine", engine],
                          preexec_fn=_limit_descriptors)
    socks: list[socket.socket] = []

    def connect(port: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        socks.append(sock)
        return sock

    try:
        port = int(log.wait_for(r"listening on 127\.0\.0\.1:(\d+) \(immediate\)").group(1))
        started = time.monotonic()
        crowd = [connect(port) for _ in range(60)]  # more than FD_LIMIT: the rest wait in backlog
        log.wait_for(r"accept on .* failed .*; pausing accepts for")
        assert log.proc.poll() is None, "the server died at EMFILE"

        # Accepted connections keep being served while accepting is backing off; the last
        # client is still in the backlog and is not.
        last = crowd[-1]
        last.sendall(b"waiting in the backlog")
        echo_round_trip(crowd[0], b"still alive at EMFILE")
        echo_round_trip(crowd[1], b"me too")
        assert_no_data(last)
        assert log.proc.poll() is None

        for sock in crowd[5:-1]:
            sock.close()
        fresh = connect(port)
        echo_round_trip(fresh, b"a fresh client after the crowd left")
        assert recv_exactly(last, 22) == b"waiting in the backlog"
        for sock in [*crowd[:5], last]:
            echo_round_trip(sock, b"the survivors too")
        elapsed = time.monotonic() - started
        # Each back-off waits accept_backoff (0.1 s) before retrying: a server spinning on
        # EMFILE would log this warning thousands of times.
        warnings = log.count("pausing accepts")
        assert 1 <= warnings <= 5 + 2 * elapsed / 0.1, (warnings, elapsed)

        for sock in socks:
            sock.close()
        socks.clear()
        log.signal(signal.SIGTERM)
        assert log.wait_exit() == 0, log.text()
    finally:
        for sock in socks:
            sock.close()
        log.kill()
    text = log.text()
    assert "Traceback" not in text, text
    assert "internal error" not in text, text


# -- 7. write_limit: the output of a peer that reads nothing is bounded ---------------------------


class CarelessWriter(RecordingHandler):
    """On b"go", writes ``total`` bytes at once, ignoring pause_writing (a careless handler)."""

    total = 0

    def data_received(self, conn: Connection, data: memoryview) -> None:
        if bytes(data) != b"go":
            return
        chunk = b"w" * (256 * KIB)
        for _ in range(self.total // len(chunk)):
            conn.write(chunk)  # after a reset, writes are dropped quietly
        self.record("wrote", conn)


def _non_reader(clients: Clients, rs: RunningServer) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    clients.sockets.append(sock)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * KIB)  # reads nothing, holds little
    sock.settimeout(WAIT)
    sock.connect(rs.address())
    return sock


def test_output_past_write_limit_resets_the_connection(
        serve: ServeFactory, clients: Clients, caplog: pytest.LogCaptureFixture) -> None:
    handler = CarelessWriter()
    handler.total = 32 * MIB  # far more than the kernel's buffers take, so it must queue
    rs = serve(ListenerConfig(write_limit=1 * MIB), handler=handler)
    sock = _non_reader(clients, rs)
    sock.sendall(b"go")
    handler.wait(lambda: [CloseReason.OUTPUT_LIMIT] in handler.closed.values(), "the reset")
    with pytest.raises(ConnectionResetError):  # an RST: the queued output is dropped
        while sock.recv(1 << 20):
            pass
    stats = listener_stats(rs)
    assert stats.closed_by_reason == {"output-limit": 1}
    lines = [r.getMessage() for r in caplog.records if "write_limit" in r.getMessage()]
    assert len(lines) == 1 and "past write_limit (1,048,576)" in lines[0]


def test_output_under_write_limit_only_pauses(serve: ServeFactory, clients: Clients) -> None:
    """The other side of the limit: a queue that stays under it pauses, never resets."""
    handler = CarelessWriter()
    handler.total = 12 * MIB  # more than the kernel's buffers take: some of it must queue
    rs = serve(ListenerConfig(write_limit=16 * MIB), handler=handler)
    sock = _non_reader(clients, rs)
    sock.sendall(b"go")
    handler.wait(lambda: "wrote" in handler.names(), "the writes")
    assert on_loop(rs, lambda: [conn.write_buffer_size for conn in rs.server.connections()])[0] > 0
    assert handler.closed == {}
    received = 0
    while received < handler.total:  # then read it all: every byte was kept
        chunk = sock.recv(1 << 20)
        assert chunk
        received += len(chunk)
    assert received == handler.total


# -- 8. the accept loop: capacity errors back off, anything else stops that listener ---------------


def test_unexpected_accept_error_stops_the_listener_without_spinning(
        serve: ServeFactory, clients: Clients, caplog: pytest.LogCaptureFixture) -> None:
    """shutdown() on a listening socket makes Linux fail accept() with EINVAL while the socket
    stays readable: not a capacity error, so no backoff and retry (which would spin or retry
    forever), but one error line, and that listener stops; the others serve on."""
    rs = serve(ListenerConfig(), ListenerConfig())
    broken = rs.server._engine_listeners[0]
    on_loop(rs, lambda: broken.sock.shutdown(socket.SHUT_RDWR))
    wait_until(lambda: listener_stats(rs).accept_errors == 1, "the failed accept")
    time.sleep(NEGATIVE_WAIT)  # a negative check: a spinning loop would count more errors
    stats = listener_stats(rs)
    assert stats.accept_errors == 1 and not stats.accepting
    lines = [r.getMessage() for r in caplog.records if "failed unexpectedly" in r.getMessage()]
    assert len(lines) == 1 and "stops accepting" in lines[0]
    echo_round_trip(clients.connect(rs.address(1)), b"the other listener still serves")
