"""Idle, read and write timeouts per listener, on every engine: each closes only the
connection that earned it, with its reason, and is counted. Deadlines are checked on both
sides: not before their time, and not long after."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time

import pytest
from conftest import (
    WAIT,
    Clients,
    RecordingHandler,
    ServeFactory,
    assert_on_time,
    join,
    recv_exactly,
    seconds_until_closed,
    start_helper,
)

from portside import CloseReason, Connection, LengthPrefixFramer, ListenerConfig, MessageHandler
from portside.engine.deadlines import DeadlineQueue
from portside.engine.timeouts import TimeoutTracker
from portside.protocols.framing import Message


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def test_idle_connection_is_closed_busy_one_is_not(serve: ServeFactory, clients: Clients) -> None:
    """The idle deadline starts at the accept and runs again from each byte either way: the
    silent client is closed on time (both sides), the chatty one outlives it."""
    timeout = 0.8
    rs = serve(ListenerConfig(idle_timeout=timeout))
    connected = time.monotonic()
    idle = clients.connect(rs.address())
    busy = clients.connect(rs.address())
    done = threading.Event()

    def chatter() -> None:  # traffic every timeout / 5 keeps the busy one alive
        while not done.wait(timeout / 5):
            busy.sendall(b"x")
            assert recv_exactly(busy, 1) == b"x"

    talker = start_helper(chatter)
    try:
        assert_on_time(seconds_until_closed(idle, connected), timeout)
        rs.handler.wait(lambda: CloseReason.IDLE_TIMEOUT in
                        [r for rs_ in rs.handler.closed.values() for r in rs_], "idle close")
        time.sleep(timeout)  # a negative check: the busy one lives past another whole timeout
        assert rs.handler.closed_count() == 1  # the busy one is still open
    finally:
        done.set()
        join(talker)
    stats = rs.server.statistics().listeners[0]
    assert stats.idle_timeouts == 1 and stats.active == 1


def test_idle_deadline_runs_from_the_last_byte(serve: ServeFactory, clients: Clients) -> None:
    """A byte either way restarts the idle deadline: measured from the last echo."""
    timeout = 0.8
    rs = serve(ListenerConfig(idle_timeout=timeout))
    sock = clients.connect(rs.address())
    for _ in range(3):  # three half-timeouts of life: past the first deadline
        time.sleep(timeout / 2)
        sock.sendall(b"y")
        assert recv_exactly(sock, 1) == b"y"
    assert_on_time(seconds_until_closed(sock, time.monotonic()), timeout)
    rs.handler.wait(lambda: rs.handler.closed_count() == 1, "the close")
    assert list(rs.handler.closed.values()) == [[CloseReason.IDLE_TIMEOUT]]
    assert rs.server.statistics().listeners[0].idle_timeouts == 1


class Framed(MessageHandler[Message]):
    def __init__(self) -> None:
        self.reasons: list[CloseReason] = []
        self.closed_at: list[float] = []
        self.lock = threading.Condition()

    def make_framer(self) -> LengthPrefixFramer:
        return LengthPrefixFramer(2)

    def message_received(self, conn: Connection, message: Message) -> None:
        self.reply(conn, bytes(message))

    def connection_closed(self, conn: Connection, reason: CloseReason) -> None:
        with self.lock:
            self.reasons.append(reason)
            self.closed_at.append(time.monotonic())
            self.lock.notify_all()


def test_unfinished_message_hits_the_read_timeout(serve: ServeFactory, clients: Clients) -> None:
    """The read deadline runs from the moment a message began, not from the accept nor from
    the last whole message: both sides are measured from the half message's send."""
    timeout = 0.8
    handler = Framed()
    rs = serve(ListenerConfig(read_timeout=timeout), handler=handler)
    sock = clients.connect(rs.address())
    time.sleep(timeout / 2)  # an idle gap owes nothing: the deadline must not count it
    sock.sendall(b"\x00\x03abc")  # a whole message: answered, nothing owed
    assert recv_exactly(sock, 5) == b"\x00\x03abc"
    time.sleep(timeout / 2)
    began = time.monotonic()
    sock.sendall(b"\x00\x10half")  # 16 bytes announced, 4 sent: the peer owes 12
    assert_on_time(seconds_until_closed(sock, began), timeout)
    with handler.lock:
        assert handler.lock.wait_for(lambda: handler.reasons == [CloseReason.READ_TIMEOUT], WAIT)
    assert rs.server.statistics().listeners[0].read_timeouts == 1


class Flooder(RecordingHandler):
    """On "go", queues ``size`` bytes in one write and notes when (the write deadline then
    runs from the last byte the peer took, a few milliseconds later at most)."""

    size = 16 << 20

    def __init__(self) -> None:
        super().__init__()
        self.wrote_at = 0.0
        self.closed_at = 0.0

    def data_received(self, conn: Connection, data: memoryview) -> None:
        self.wrote_at = time.monotonic()
        conn.write(b"z" * self.size)
        self.record("data_received", conn, len(data))

    def connection_closed(self, conn: Connection, reason: CloseReason) -> None:
        self.closed_at = time.monotonic()
        super().connection_closed(conn, reason)


def test_peer_that_does_not_read_hits_the_write_timeout(
        serve: ServeFactory, clients: Clients) -> None:
    """A peer that takes nothing: the write deadline fires ``write_timeout`` after the last
    progress, measured in the server's own process from the write that stalled."""
    timeout = 0.8
    handler = Flooder()
    rs = serve(ListenerConfig(write_timeout=timeout, write_high_water=64 << 20,
                              write_low_water=1 << 19), handler=handler)
    sock = clients.connect(rs.address())
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(b"go")
    handler.wait(lambda: [CloseReason.WRITE_TIMEOUT] in handler.closed.values(),
                 "the write timeout")
    assert_on_time(handler.closed_at - handler.wrote_at, timeout)
    assert rs.server.statistics().listeners[0].write_timeouts == 1


@pytest.mark.parametrize("kind", ["write_timeout", "idle_timeout"])
def test_a_reading_peer_outlives_the_write_and_idle_timeouts(
        serve: ServeFactory, clients: Clients, kind: str) -> None:
    """Progress restarts the write deadline, and so do bytes flushed from the queue the idle
    one: a peer that only reads, two megabytes every tenth of a second, receives the whole
    32 MiB over more than the timeout, and is not cut off. (Fast enough that what the kernel
    buffers, some megabytes, drains well within the timeout.)"""
    timeout = 1.0
    handler = Flooder()
    handler.size = 32 << 20
    config = ListenerConfig(write_high_water=64 << 20, write_low_water=1 << 19)
    if kind == "write_timeout":
        config = dataclasses.replace(config, write_timeout=timeout)
    else:
        config = dataclasses.replace(config, idle_timeout=timeout)
    rs = serve(config, handler=handler)
    sock = clients.connect(rs.address())
    sock.sendall(b"go")
    started, received = time.monotonic(), 0
    while received < handler.size:
        time.sleep(0.1)
        burst = 0
        while burst < 2 << 20 and received + burst < handler.size:
            chunk = sock.recv(min(1 << 20, handler.size - received - burst))
            assert chunk, f"closed after {received + burst} bytes while the peer was reading"
            burst += len(chunk)
        received += burst
    assert time.monotonic() - started > timeout  # the test spanned the deadline
    assert handler.closed_count() == 0
    stats = rs.server.statistics().listeners[0]
    assert stats.write_timeouts == stats.idle_timeouts == 0


def test_bytes_sent_restart_the_idle_deadline(serve: ServeFactory, clients: Clients) -> None:
    """A client that only listens while the server speaks (a byte every 0.4 timeout) is not
    idle: the connection outlives three idle timeouts."""
    timeout = 0.8
    rs = serve(ListenerConfig(idle_timeout=timeout))
    sock = clients.connect(rs.address())
    sock.sendall(b"!")  # the only byte it sends
    assert recv_exactly(sock, 1) == b"!"
    (conn,) = rs.server.connections()
    ends = time.monotonic() + 3 * timeout
    while time.monotonic() < ends:
        time.sleep(0.4 * timeout)
        rs.server.call_soon_threadsafe(lambda: conn.write(b"t"))  # the server speaks
        assert recv_exactly(sock, 1) == b"t"
    assert rs.handler.closed_count() == 0
    assert rs.server.statistics().listeners[0].idle_timeouts == 0


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[tuple[float, object]] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: object) -> object:
        self.timers.append((self.now + delay, callback))
        return self


def test_tracker_arms_one_timer_for_many_connections() -> None:
    clock = _Clock()
    expired: list[object] = []
    tracker = TimeoutTracker(10.0, expired.append)
    tracker.attach(clock)  # type: ignore[arg-type]
    conns = [object() for _ in range(10_000)]
    for conn in conns:
        tracker.start(conn)  # type: ignore[arg-type]
    assert len(clock.timers) == 1  # one timer, not ten thousand
    assert isinstance(tracker.queue, DeadlineQueue) and len(tracker.queue) == 10_000


# -- read_timeout on a handler that frames no messages: no bytes from the peer for that long ----


def test_read_timeout_without_framing_closes_a_silent_peer(
        serve: ServeFactory, clients: Clients) -> None:
    """The echo handler never calls awaiting_data: read_timeout then means "no byte from the
    peer for that long". A silent client is closed no sooner than that (and by 1.25 times it,
    plus the loop's slack); a client that keeps sending is not, though it idles in between."""
    timeout = 1.0
    rs = serve(ListenerConfig(read_timeout=timeout))
    connected = time.monotonic()
    silent = clients.connect(rs.address())
    talker = clients.connect(rs.address())
    done = threading.Event()

    def chatter() -> None:  # a byte every 0.6 timeout: never silent for a whole timeout,
        while not done.wait(0.6 * timeout):  # though silent through two looks at a time
            talker.sendall(b"x")
            assert recv_exactly(talker, 1) == b"x"

    thread = start_helper(chatter)
    try:
        assert_on_time(seconds_until_closed(silent, connected), timeout, 1.25 * timeout)
        # The talker outlives three more timeouts.
        time.sleep(3 * timeout)  # a negative check: only an early close can fail it
        assert thread.is_alive(), "the talker's connection ended"
    finally:
        done.set()
        join(thread)
    rs.handler.wait(lambda: rs.handler.closed_count() == 1, "the silent one's close")
    assert list(rs.handler.closed.values()) == [[CloseReason.READ_TIMEOUT]]
    stats = rs.server.statistics().listeners[0]
    assert stats.read_timeouts == 1 and stats.active == 1


def test_read_silence_counts_from_the_last_byte_at_most_a_quarter_late(
        serve: ServeFactory, clients: Clients) -> None:
    """The silence is looked at every read_timeout / 4 from the accept: a last byte just after
    a look is closed read_timeout plus almost one look later (1.2 s here), never 1.5x (as
    with looks every half timeout)."""
    timeout = 1.0
    rs = serve(ListenerConfig(read_timeout=timeout))
    connected = time.monotonic()
    sock = clients.connect(rs.address())
    time.sleep(0.55 * timeout)  # just after the look at 0.5 (and at 0.5 with half-looks)
    sock.sendall(b"z")
    sent = time.monotonic()
    assert recv_exactly(sock, 1) == b"z"
    assert sent - connected < 0.7 * timeout, "the client was too slow to test the phase"
    assert_on_time(seconds_until_closed(sock, sent), timeout, 1.25 * timeout)
    rs.handler.wait(lambda: rs.handler.closed_count() == 1, "the close")
    assert list(rs.handler.closed.values()) == [[CloseReason.READ_TIMEOUT]]


class Managing(RecordingHandler):
    """Takes read_timeout over at once: owes nothing until it says so."""

    def connection_made(self, conn: Connection, first_data: memoryview | None) -> None:
        conn.awaiting_data(False)
        super().connection_made(conn, first_data)


def test_read_timeout_is_the_handlers_once_it_calls_awaiting_data(
        serve: ServeFactory, clients: Clients) -> None:
    timeout = 0.3
    rs = serve(ListenerConfig(read_timeout=timeout), handler=Managing())
    sock = clients.connect(rs.address())
    echo = b"still open"
    time.sleep(4 * timeout)  # a negative check: silence alone must not close it now
    sock.sendall(echo)
    assert recv_exactly(sock, len(echo)) == echo
    assert rs.server.statistics().listeners[0].read_timeouts == 0


def test_silence_tracker_looks_without_arming_twice() -> None:
    """A look that finds the connection alive starts it again from inside the sweep: the
    tracker still runs one timer, and the look is not counted as an expiry."""
    clock = _Clock()
    looked: list[object] = []
    tracker: TimeoutTracker

    def look(conn: object) -> bool:
        looked.append(conn)
        tracker.start(conn)  # type: ignore[arg-type]
        return False

    tracker = TimeoutTracker(1.0, look)
    tracker.attach(clock)  # type: ignore[arg-type]
    tracker.start(object())  # type: ignore[arg-type]
    for _ in range(3):
        assert len(clock.timers) == 1
        due, callback = clock.timers.pop()
        clock.now = due
        callback()  # type: ignore[operator]
    assert len(looked) == 3 and tracker.expired == 0 and len(clock.timers) == 1
