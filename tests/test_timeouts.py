"""Idle, read and write timeouts per listener, on every engine: each closes only the
connection that earned it, with its reason, and is counted."""

from __future__ import annotations

import socket
import threading

from conftest import WAIT, Clients, ServeFactory, recv_exactly

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
    rs = serve(ListenerConfig(idle_timeout=0.4))
    idle, busy = clients.connect(rs.address()), clients.connect(rs.address())
    done = threading.Event()

    def chatter() -> None:  # traffic every 0.1 s keeps the busy one alive
        while not done.wait(0.1):
            busy.sendall(b"x")
            assert recv_exactly(busy, 1) == b"x"

    talker = threading.Thread(target=chatter)
    talker.start()
    try:
        assert closed_by_server(idle)
        rs.handler.wait(lambda: CloseReason.IDLE_TIMEOUT in
                        [r for rs_ in rs.handler.closed.values() for r in rs_], "idle close")
        assert rs.handler.closed_count() == 1  # the busy one is still open
    finally:
        done.set()
        talker.join(WAIT)
    stats = rs.server.statistics().listeners[0]
    assert stats.idle_timeouts == 1 and stats.active == 1


class Framed(MessageHandler[Message]):
    def __init__(self) -> None:
        self.reasons: list[CloseReason] = []
        self.lock = threading.Condition()

    def make_framer(self) -> LengthPrefixFramer:
        return LengthPrefixFramer(2)

    def message_received(self, conn: Connection, message: Message) -> None:
        self.reply(conn, bytes(message))

    def connection_closed(self, conn: Connection, reason: CloseReason) -> None:
        with self.lock:
            self.reasons.append(reason)
            self.lock.notify_all()


def test_unfinished_message_hits_the_read_timeout(serve: ServeFactory, clients: Clients) -> None:
    handler = Framed()
    rs = serve(ListenerConfig(read_timeout=0.4), handler=handler)
    sock = clients.connect(rs.address())
    sock.sendall(b"\x00\x03abc")  # a whole message: answered, nothing owed
    assert recv_exactly(sock, 5) == b"\x00\x03abc"
    sock.sendall(b"\x00\x10half")  # 16 bytes announced, 4 sent: the peer owes 12
    assert closed_by_server(sock)
    with handler.lock:
        assert handler.lock.wait_for(lambda: handler.reasons == [CloseReason.READ_TIMEOUT], WAIT)
    assert rs.server.statistics().listeners[0].read_timeouts == 1


def test_peer_that_does_not_read_hits_the_write_timeout(
        serve: ServeFactory, clients: Clients) -> None:
    rs = serve(ListenerConfig(write_timeout=0.5, write_high_water=1 << 20,
                              write_low_water=1 << 19))
    sock = clients.connect(rs.address())
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sender = threading.Thread(target=lambda: _send_until_reset(sock))
    sender.start()
    rs.handler.wait(lambda: [CloseReason.WRITE_TIMEOUT] in rs.handler.closed.values(),
                    "the write timeout")
    sender.join(WAIT)
    assert rs.server.statistics().listeners[0].write_timeouts == 1


def _send_until_reset(sock: socket.socket) -> None:
    try:
        for _ in range(2000):  # at most 128 MiB, never read back
            sock.sendall(b"z" * 65536)
    except OSError:
        return


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
