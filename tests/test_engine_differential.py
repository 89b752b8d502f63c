"""The compiled engine against the reference: the same events, the same outcome (issue 18).

Theory of operation. One ``Server`` per engine (compiled and epoll) runs on loopback in its own
thread, each with the same four listeners (immediate and data-first, each with a handler that
overrides every callback and one that leaves most of them as ``Handler`` defines them, which
the compiled engine inlines). A hypothesis ``RuleBasedStateMachine`` opens one client
connection to the same listener of both servers and applies every step to both: the client's
socket sends, half-closes, resets or drains; the handler writes, closes, aborts, half-closes,
pauses or resumes reading (on the server's loop, waited for); a timeout fires. After each step
both sides are let settle, then compared: the handler's callbacks in order with their
arguments (bytes merged across reads, whose split the kernel decides), the connection's
counters and state, and at the end of each example the listener's statistics.

Determinism. Nothing waits on a sleep. A step's effect is waited for by a condition read on
the server's loop (the bytes the client sent have been read, its FIN seen, its reset noticed,
the connection closed), each read a round trip through ``call_soon_threadsafe``, so the
snapshot is taken between two readiness events, never during one. What the kernel decides is
kept out of the comparison or out of the generated steps: how a write splits between the
kernel and the queue (the size passed to pause_writing; bytes_out while a queue waits) is not
compared, and writes are either small enough that the kernel surely takes them whole or large
enough (``BIG``) that they surely queue past write_high_water, never in between; the same for
write_limit. Timeouts are set long (they never fire by themselves within an example) and are
fired by a step: the deadline of a connection the tracker is running is moved into the past
and the tracker swept, as its timer would (read-silence is swept until it decides).
"""

from __future__ import annotations

import socket
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from conftest import HAVE_COMPILED, WAIT, require
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from portside import (
    AcceptPolicy,
    CloseReason,
    Connection,
    Engine,
    Handler,
    ListenerConfig,
    Server,
    ServerConfig,
)
from portside.engine import states
from portside.engine.listener import Listener
from portside.engine.states import CLOSED, CLOSING, LINGERING, OPEN, PENDING

T = TypeVar("T")

KIB = 1024
#: The water marks and the output limit every listener here has; small, so backpressure and
#: the limit are reached in a few steps.
HIGH_WATER, LOW_WATER, WRITE_LIMIT = 16 * KIB, 4 * KIB, 1024 * KIB
#: A handler write that surely queues past HIGH_WATER: far more than the kernel takes (the
#: socket buffers below are small; MAX_KERNEL bounds what they hold).
BIG = 300 * KIB
#: At most this many bytes the handler wrote and the client did not read are "small": the
#: kernel takes them whole (handler_writes checks that it did).
SMALL_ROOM = 8 * KIB
#: An upper bound of what the kernel takes of a write the client does not read (server's send
#: buffer + client's receive buffer, both set small).
MAX_KERNEL = 160 * KIB
#: The most the client sends that the server has not read (reading paused): sendall never
#: blocks below this.
CLIENT_ROOM = 48 * KIB
SOCKET_BUFFER = 16 * KIB
#: Long timeouts: they never fire by themselves during an example; steps fire them.
TIMEOUT = 120.0
_LINGER_RST = struct.pack("ii", 1, 0)
_PENDING, _OPEN, _CLOSING, _LINGERING, _CLOSED = (PENDING, OPEN, CLOSING, LINGERING, CLOSED)


def pattern(start: int, size: int) -> bytes:
    """``size`` bytes of a stream whose byte at offset i is i mod 251: a misplaced or lost
    chunk shows in the bytes, not only in their count."""
    return bytes((start + i) % 251 for i in range(size))


# -- handlers ------------------------------------------------------------------------------------


class Recorder:
    """The callbacks of one listener's handler, in order, with their arguments."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.cond = threading.Condition()

    def record(self, *event: Any) -> None:
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()

    def take(self) -> list[tuple[Any, ...]]:
        with self.cond:
            events, self.events = self.events, []
            return events

    def snapshot(self) -> list[tuple[Any, ...]]:
        with self.cond:
            return list(self.events)

    def wait_for(self, predicate: Callable[[list[tuple[Any, ...]]], bool]) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: predicate(self.events), WAIT), (
                f"timed out; events {self.events}")


class FullHandler(Handler):
    """Overrides every connection callback: records it, and does nothing else (the peer's
    FIN leaves the connection half-open)."""

    def __init__(self) -> None:
        self.recorder = Recorder()

    def connection_made(self, conn: Connection, first_data: memoryview | None) -> None:
        self.recorder.record("made", None if first_data is None else bytes(first_data))

    def data_received(self, conn: Connection, data: memoryview) -> None:
        self.recorder.record("data", bytes(data))

    def eof_received(self, conn: Connection) -> None:
        self.recorder.record("eof")

    def write_drained(self, conn: Connection) -> None:
        self.recorder.record("drained", conn.write_buffer_size)

    def pause_writing(self, conn: Connection) -> None:
        # The queue's size here is the kernel's choice: not recorded.
        self.recorder.record("pause_writing", conn.reading_paused)

    def resume_writing(self, conn: Connection) -> None:
        self.recorder.record("resume_writing", conn.write_buffer_size <= LOW_WATER)

    def connection_reset(self, conn: Connection) -> None:
        self.recorder.record("reset", conn.close_reason)

    def connection_closed(self, conn: Connection, reason: CloseReason) -> None:
        self.recorder.record("closed", reason, conn.bytes_in, conn.bytes_out,
                             conn.write_buffer_size)

    def error(self, conn: Connection | None, exc: BaseException) -> None:
        self.recorder.record("error", type(exc).__name__)


class DefaultsHandler(Handler):
    """Leaves connection_made, eof_received (close), write_drained, pause/resume_writing and
    connection_reset to ``Handler``: the compiled engine runs those defaults inline."""

    def __init__(self) -> None:
        self.recorder = Recorder()

    def data_received(self, conn: Connection, data: memoryview) -> None:
        self.recorder.record("data", bytes(data))

    def connection_closed(self, conn: Connection, reason: CloseReason) -> None:
        self.recorder.record("closed", reason, conn.bytes_in, conn.bytes_out,
                             conn.write_buffer_size)

    def error(self, conn: Connection | None, exc: BaseException) -> None:
        self.recorder.record("error", type(exc).__name__)


def normalized(events: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The callbacks as a user can rely on them: a data-first connection's first bytes and
    every read after are one stream (the kernel decides how reads split), merged, and shown
    as their length and CRC-32."""
    out: list[tuple[Any, ...]] = []
    for event in events:
        if event[0] == "made" and event[1] is not None:
            out.append(("made", "with data"))
            event = ("data", event[1])
        if event[0] == "data" and out and out[-1][0] == "data":
            out[-1] = ("data", out[-1][1] + event[1])
        else:
            out.append(event)
    return [("data", len(event[1]), zlib.crc32(event[1])) if event[0] == "data" else event
            for event in out]


# -- one engine's server -------------------------------------------------------------------------

LISTENERS = [(policy, kind) for policy in (AcceptPolicy.IMMEDIATE, AcceptPolicy.DATA_FIRST)
             for kind in (FullHandler, DefaultsHandler)]


@dataclass
class EngineServer:
    """One engine's server with a listener per entry of LISTENERS, running in a thread."""

    engine: Engine
    server: Server = field(init=False)
    handlers: list[FullHandler | DefaultsHandler] = field(init=False)
    thread: threading.Thread = field(init=False)
    failure: list[BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.handlers = [kind() for _, kind in LISTENERS]
        listeners = [ListenerConfig(
            policy=policy, handler=handler, write_high_water=HIGH_WATER,
            write_low_water=LOW_WATER, write_limit=WRITE_LIMIT, sndbuf=SOCKET_BUFFER,
            idle_timeout=TIMEOUT, read_timeout=TIMEOUT, write_timeout=TIMEOUT,
            first_data_timeout=TIMEOUT, defer_accept=0)
            for (policy, _), handler in zip(LISTENERS, self.handlers, strict=True)]
        # linger_timeout long too: a closed connection waits for the client's FIN, whenever
        # the steps send it, on both engines alike.
        config = ServerConfig(engine=self.engine, linger_timeout=TIMEOUT, drain_timeout=0.5)
        self.server = Server(Handler(), listeners, config)
        self.server.start()
        self.thread = threading.Thread(target=self._run, name=f"diff-{self.engine.value}",
                                       daemon=True)
        self.thread.start()
        assert self.server.started.wait(WAIT), "server did not start"

    def _run(self) -> None:
        try:
            self.server.run(install_signal_handlers=False)
        except BaseException as exc:  # reported by stop()
            self.failure.append(exc)

    def on_loop(self, action: Callable[[], T]) -> T:
        """Run ``action`` on the server's loop and return what it returned (or raise what it
        raised), waiting for it."""
        done = threading.Event()
        result: list[Any] = []

        def run() -> None:
            try:
                result.append((True, action()))
            except BaseException as exc:
                result.append((False, exc))
            finally:
                done.set()

        self.server.call_soon_threadsafe(run)
        assert done.wait(WAIT), f"the {self.engine.value} loop did not run a callback"
        ok, value = result[0]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def stop(self) -> None:
        self.server.shutdown(0.5)
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), f"the {self.engine.value} server did not stop"
        assert not self.failure, f"the {self.engine.value} server raised {self.failure!r}"


ListenerFigures = dict[str, Any]


def listener_figures(server: Server, index: int) -> ListenerFigures:
    stats = server.statistics().listeners[index]
    return {
        "accepted": stats.accepted, "closed": stats.closed, "pending": stats.pending,
        "active": stats.active, "bytes_in": stats.bytes_in, "bytes_out": stats.bytes_out,
        "closed_by_reason": dict(stats.closed_by_reason),
        "idle_timeouts": stats.idle_timeouts, "read_timeouts": stats.read_timeouts,
        "write_timeouts": stats.write_timeouts,
        "first_data_timeouts": stats.first_data_timeouts, "ttfb_count": stats.ttfb_count,
    }


def figures_delta(before: ListenerFigures, after: ListenerFigures) -> ListenerFigures:
    delta: ListenerFigures = {}
    for name, value in after.items():
        if name == "closed_by_reason":
            delta[name] = {reason: count - before[name].get(reason, 0)
                           for reason, count in value.items()
                           if count != before[name].get(reason, 0)}
        elif name in ("pending", "active"):
            delta[name] = value
        else:
            delta[name] = value - before[name]
    return delta


# -- one engine's connection ---------------------------------------------------------------------


@dataclass
class Snapshot:
    """A connection as the test reads it on the loop; ``closed`` once the handler heard so."""

    closed: bool
    state: int = _CLOSED
    bytes_in: int = 0
    bytes_out: int = 0
    buffered: int = 0
    eof: bool = False
    reading_paused: bool = False
    user_paused: bool = False
    writing: bool = False
    is_open: bool = False
    is_pending: bool = False
    deadlines: tuple[str, ...] = ()

    def public(self, exact_out: bool) -> dict[str, Any]:
        """What is compared: the kernel decides bytes_out and the queue while one waits."""
        view = dict(vars(self))
        if not exact_out:
            view["bytes_out"] = view["buffered"] = None
            view["written"] = self.bytes_out + self.buffered
        return view


class Side:
    """One engine's half of an example: the client socket and the server's connection."""

    def __init__(self, server: EngineServer, index: int) -> None:
        self.es = server
        self.index = index
        self.handler = server.handlers[index]
        self.listener = server.server.listeners[index]
        self.handler.recorder.take()
        self.before = server.on_loop(lambda: listener_figures(server.server, index))
        self.client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        self.client.settimeout(WAIT)
        self.client.connect(("127.0.0.1", self.listener.port))
        self.name = self.client.getsockname()
        self.conn: Connection | None = None
        self.received = bytearray()  # what the client read of the handler's writes
        self.client_open = True
        self._find_connection()

    def _find_connection(self) -> None:
        def find() -> Connection | None:
            for conn in self.es.server.connections():
                if conn.listener is self.listener and conn.peer_address == self.name:
                    return conn
            return None

        for _ in range(1000):
            conn = self.es.on_loop(find)
            if conn is not None:
                self.conn = conn
                return
            with self.handler.recorder.cond:
                self.handler.recorder.cond.wait(0.01)  # woken early by any callback
        raise AssertionError(f"{self.es.engine.value}: the server never accepted")

    def closed_recorded(self) -> bool:
        return any(event[0] == "closed" for event in self.handler.recorder.snapshot())

    def snapshot(self) -> Snapshot:
        def read() -> Snapshot:
            conn = self.conn
            if conn is None or self.closed_recorded():
                return Snapshot(closed=True)
            listener: Any = conn.listener
            trackers = {"idle": listener.idle_tracker, "read": listener.read_tracker,
                        "write": listener.write_tracker, "silence": listener.silence}
            deadlines = tuple(kind for kind, tracker in trackers.items()
                              if tracker is not None and conn in tracker.queue)
            internal: Any = conn
            return Snapshot(
                closed=False, state=int(internal._state), bytes_in=conn.bytes_in,
                bytes_out=conn.bytes_out, buffered=conn.write_buffer_size,
                eof=conn.eof_received, reading_paused=conn.reading_paused,
                user_paused=bool(internal._user_paused), writing=bool(internal._writing),
                is_open=conn.is_open, is_pending=conn.is_pending, deadlines=deadlines)

        return self.es.on_loop(read)

    def handler_action(self, action: Callable[[Connection], object], name: str) -> None:
        """Run ``action`` on the server's connection, on its loop; what it raises is recorded
        (as the user would see it) instead of raised."""
        def run() -> None:
            assert self.conn is not None
            if self.closed_recorded():
                return
            try:
                action(self.conn)
            except Exception as exc:
                self.handler.recorder.record(f"{name} raised", type(exc).__name__)

        self.es.on_loop(run)

    def settle(self, sent: int, client_fin: bool, client_reset: bool) -> Snapshot:
        """Wait until the client's events have had their effect on the server (read, FIN
        seen, reset noticed); then return the connection's snapshot."""
        for _ in range(2000):
            snap = self.snapshot()
            if self._settled(snap, sent, client_fin, client_reset):
                return snap
            with self.handler.recorder.cond:
                self.handler.recorder.cond.wait(0.005)  # woken early by any callback
        raise AssertionError(f"{self.es.engine.value} did not settle: {snap} "
                             f"(sent {sent}, fin {client_fin}, reset {client_reset}); "
                             f"events {normalized(self.handler.recorder.snapshot())[-8:]}")

    @staticmethod
    def _settled(snap: Snapshot, sent: int, client_fin: bool, client_reset: bool) -> bool:
        if snap.closed:
            return True
        if snap.state == _LINGERING:  # reads, and ends at the client's FIN or reset
            return not (client_fin or client_reset)
        reading = snap.state <= _OPEN and not snap.reading_paused and not snap.eof
        if client_reset and (reading or snap.writing):
            return False  # the reset will be noticed (a read or a send fails)
        if reading and snap.bytes_in < sent:
            return False
        return not (reading and client_fin and not client_reset)

    def figures(self) -> ListenerFigures:
        after = self.es.on_loop(lambda: listener_figures(self.es.server, self.index))
        return figures_delta(self.before, after)

    def close(self) -> None:
        """End the example: the handler aborts what is still open, the client closes."""
        self.handler_action(lambda conn: conn.abort(), "abort")
        self.client.close()
        self.client_open = False


# -- the state machine ---------------------------------------------------------------------------

ENGINES: tuple[EngineServer, EngineServer] | None = None


class Differential(RuleBasedStateMachine):
    """One connection per example, on both engines at once; see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.sides: list[Side] = []
        self.sent = 0  # bytes the client sent
        self.client_fin = self.client_reset = False
        self.snap = Snapshot(closed=False)
        #: Whether the write queue was empty at the last look: bytes_out is the kernel's choice
        #: while one waits, and so is the final bytes_out of a connection that ends then (None
        #: until it ends).
        self.exact_out = True
        self.close_exact: bool | None = None
        self.big_write = False  # this step queues a BIG write

    @initialize(listener=st.sampled_from(range(len(LISTENERS))))
    def connect(self, listener: int) -> None:
        assert ENGINES is not None
        self.sides = [Side(server, listener) for server in ENGINES]
        self.full = LISTENERS[listener][1] is FullHandler
        self.settle()

    # -- helpers

    def settle(self) -> None:
        snaps = [side.settle(self.sent, self.client_fin, self.client_reset)
                 for side in self.sides]
        self.snap = snaps[0]
        if self.snap.closed and self.close_exact is None:
            self.close_exact = self.exact_out and not self.big_write
        self.exact_out = self.snap.closed or self.snap.buffered == 0
        self.big_write = False
        self.compare(snaps)

    def compare(self, snaps: list[Snapshot] | None = None) -> None:
        snaps = snaps or [side.snapshot() for side in self.sides]
        events = [normalized(side.handler.recorder.snapshot()) for side in self.sides]
        if self.close_exact is False:  # bytes_out at the end: what the kernel had taken
            events = [[e[:3] if e[0] == "closed" else e for e in side] for side in events]
        assert events[0] == events[1], (
            f"callbacks differ:\n  compiled {events[0]}\n  epoll    {events[1]}")
        views = [snap.public(self.exact_out) for snap in snaps]
        assert views[0] == views[1], (
            f"connections differ:\n  compiled {views[0]}\n  epoll    {views[1]}")
        received = [bytes(side.received) for side in self.sides]
        assert received[0] == received[1], "the client read different bytes"

    def both_handlers(self, action: Callable[[Connection], object], name: str) -> None:
        for side in self.sides:
            side.handler_action(action, name)
        self.settle()

    def outstanding(self) -> int:
        """Bytes the handler wrote that the client has not read."""
        snap = self.snap
        return snap.bytes_out + snap.buffered - len(self.sides[0].received)

    def server_alive(self) -> bool:
        return not self.snap.closed and self.snap.state != _PENDING

    # -- the client

    def client_can_send(self) -> bool:
        return (not self.client_fin and not self.client_reset and not self.snap.closed
                and self.snap.state <= _OPEN)

    @precondition(lambda self: self.client_can_send() and self.send_room() > 0)
    @rule(size=st.sampled_from([1, 7, 1000, 9000, 40_000, 100_000]))
    def client_sends(self, size: int) -> None:
        size = min(size, self.send_room())
        data = pattern(self.sent, size)
        for side in self.sides:
            side.client.sendall(data)
        self.sent += size
        self.settle()

    def send_room(self) -> int:
        """What the client may send now without blocking: anything while the server reads,
        CLIENT_ROOM unread bytes while it does not."""
        reading = (self.snap.state <= _OPEN and not self.snap.reading_paused
                   and not self.snap.eof)
        return 10**6 if reading else CLIENT_ROOM - (self.sent - self.snap.bytes_in)

    @precondition(lambda self: not self.client_reset)
    @rule(how=st.sampled_from(["shutdown", "reset"]))
    def client_ends(self, how: str) -> None:
        """The client half-closes (FIN; once only) or resets (SO_LINGER 0, then close)."""
        if self.snap.closed:  # an aborted connection's client has nothing to shut down
            how = "reset"
        if how == "shutdown" and not self.client_fin:
            for side in self.sides:
                side.client.shutdown(socket.SHUT_WR)
            self.client_fin = True
        elif how == "reset":
            for side in self.sides:
                side.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                side.client.close()
                side.client_open = False
            self.client_reset = True
        self.settle()

    def input_waits(self) -> bool:
        """The client sent bytes or its FIN that the server has not read yet."""
        return self.sent > self.snap.bytes_in or (self.client_fin and not self.snap.eof)

    @precondition(lambda self: not self.client_reset and not self.snap.closed
                  and self.outstanding() > 0
                  and (self.snap.user_paused or not self.input_waits()))
    @rule()
    def client_drains(self) -> None:
        """The client reads every byte the handler wrote so far. Not while input waits that
        the drain would let in (reading resumes below write_low_water): whether it is read
        before or after the queue empties (write_drained) is the kernel's timing."""
        target = len(self.sides[0].received) + self.outstanding()
        for side in self.sides:
            while len(side.received) < target:
                chunk = side.client.recv(min(256 * KIB, target - len(side.received)))
                assert chunk, f"{side.es.engine.value}: EOF before the handler's bytes"
                side.received.extend(chunk)
        self.settle()

    # -- the handler

    @precondition(lambda self: self.server_alive() and (
        self.snap.buffered > 0 or self.outstanding() < SMALL_ROOM))
    @rule(size=st.sampled_from([1, 100, 2000]))
    def handler_writes(self, size: int) -> None:
        if not self.snap.buffered:
            size = min(size, SMALL_ROOM - self.outstanding())
        queued = self.snap.buffered
        start = self.snap.bytes_out + queued
        data = pattern(start, size)
        self.both_handlers(lambda conn: conn.write(data), "write")
        assert queued or self.snap.closed or not self.snap.buffered, (
            "the kernel did not take a small write whole: SMALL_ROOM is too large here")

    def big_write_is_certain(self) -> bool:
        """Past write_limit for sure, or surely not: never in between."""
        after = self.outstanding() + BIG
        return after <= WRITE_LIMIT or after - MAX_KERNEL > WRITE_LIMIT

    @precondition(lambda self: self.server_alive() and self.big_write_is_certain())
    @rule()
    def handler_writes_big(self) -> None:
        data = pattern(self.snap.bytes_out + self.snap.buffered, BIG)
        self.big_write = True
        self.both_handlers(lambda conn: conn.write(data), "write")

    @precondition(lambda self: self.server_alive())
    @rule(action=st.sampled_from(["close", "abort", "write_eof", "pause_reading",
                                  "resume_reading"]))
    def handler_calls(self, action: str) -> None:
        self.both_handlers(lambda conn: getattr(conn, action)(), action)

    @precondition(lambda self: self.server_alive())
    @rule(kind=st.sampled_from(["idle", "write", "silence"]))
    def timeout_fires(self, kind: str) -> None:
        """The ``kind`` deadline passes, if it is running for the connection (the tracker's
        timer would do this; read-silence looks until it decides, as its timer would)."""
        def fire(conn: Connection) -> None:
            listener: Any = conn.listener
            tracker = getattr(listener, "silence" if kind == "silence" else f"{kind}_tracker")
            for _ in range(8):
                if conn not in tracker.queue:
                    return
                now = listener._core.reactor.time()
                tracker.queue.add(conn, now - tracker.queue.timeout - 1.0)
                tracker._sweep()

        self.both_handlers(fire, f"{kind} timeout")

    @precondition(lambda self: self.snap.closed)
    @rule()
    def look_again(self) -> None:
        """Nothing new happens: both are looked at again (always possible, so an example
        whose connection has ended still has a step to take)."""
        self.settle()

    def teardown(self) -> None:
        if not self.sides:
            return
        for side in self.sides:
            side.close()
        for side in self.sides:
            side.settle(self.sent, True, True)
        if self.close_exact is None:
            self.close_exact = self.exact_out
        self.compare()
        figures = [side.figures() for side in self.sides]
        if not self.close_exact:
            for figure in figures:
                figure["bytes_out"] = None  # what the kernel had taken at the end
        assert figures[0] == figures[1], (
            f"listener statistics differ:\n  compiled {figures[0]}\n  epoll    {figures[1]}")
        assert figures[0]["pending"] == figures[0]["active"] == 0


@pytest.fixture(scope="module")
def engines() -> Any:
    require(HAVE_COMPILED, "the compiled engine (pip install -e . builds it)")
    global ENGINES
    servers = (EngineServer(Engine.COMPILED), EngineServer(Engine.EPOLL))
    ENGINES = servers
    try:
        yield servers
    finally:
        ENGINES = None
        for server in servers:
            server.stop()


def test_engines_agree(engines: Any) -> None:
    """Random event sequences give the same callbacks, counters and statistics on both."""
    run: Callable[..., None] = run_state_machine_as_test  # typed only in newer hypothesis
    run(Differential, settings=settings(
        max_examples=200, stateful_step_count=20, deadline=None, derandomize=True,
        database=None, suppress_health_check=[HealthCheck.too_slow,
                                              HealthCheck.filter_too_much]))


# -- a difference found -------------------------------------------------------------------------


def eof_after_handler_changed(engine: Engine, on_class: bool = False) -> list[tuple[Any, ...]]:
    """A handler that leaves eof_received to Handler (close) serves one connection, then
    takes over eof_received (an instance attribute, or its class's when ``on_class``, set on
    the loop): what the second connection's FIN does."""
    kind = type("Fresh", (DefaultsHandler,), {})  # its own class, changed alone
    handler = kind()
    server = Server(handler, [ListenerConfig()], ServerConfig(engine=engine))
    server.start()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            server.run(install_signal_handlers=False)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, name=f"diff-eof-{engine.value}", daemon=True)
    thread.start()
    assert server.started.wait(WAIT)
    address = ("127.0.0.1", server.listeners[0].port)
    try:
        with socket.create_connection(address, WAIT) as first:
            first.sendall(b"x")
            handler.recorder.wait_for(lambda events: any(e[0] == "data" for e in events))
        handler.recorder.wait_for(lambda events: any(e[0] == "closed" for e in events))
        handler.recorder.take()
        done = threading.Event()

        def take_over() -> None:
            if on_class:  # setattr: a method set on purpose, on a running server
                setattr(kind, "eof_received",  # noqa: B010
                        lambda self, conn: self.recorder.record("eof"))
            else:
                setattr(handler, "eof_received",  # noqa: B010
                        lambda conn: handler.recorder.record("eof"))
            done.set()

        server.call_soon_threadsafe(take_over)
        assert done.wait(WAIT)
        with socket.create_connection(address, WAIT) as second:
            second.sendall(b"y")
            second.shutdown(socket.SHUT_WR)
            handler.recorder.wait_for(lambda events: any(e[0] in ("eof", "closed")
                                                         for e in events))
            return [event[:2] for event in handler.recorder.snapshot()]
    finally:
        server.shutdown(0.5)
        thread.join(WAIT)
        assert not failure, failure


@pytest.mark.parametrize("on_class", [False, True], ids=["instance", "class"])
def test_a_callback_taken_over_later_is_called(engines: Any, on_class: bool) -> None:
    """A callback is looked up at each call on both engines: one taken over after the first
    accept is called (the compiled engine once fixed Handler's defaults at the first accept)."""
    compiled, epoll = (eof_after_handler_changed(engine, on_class)
                       for engine in (Engine.COMPILED, Engine.EPOLL))
    assert epoll == [("data", b"y"), ("eof",)]
    assert compiled == epoll


# -- the twins' units --------------------------------------------------------------------------


class Finished:
    """What a listener reads of a connection that closed (hashable, as the trackers need)."""

    def __init__(self, reason: CloseReason | None) -> None:
        self.close_reason, self.bytes_in, self.bytes_out, self._fd = reason, 1, 2, -1


def test_both_listeners_tally_closes_alike() -> None:
    """Each close reason (and none) is counted the same by the compiled and the pure listener:
    one tally, ``states.count_close``."""
    require(HAVE_COMPILED, "the compiled engine")
    tallies = []
    for listener in listener_pair():
        with listener.sock:
            for reason in [*CloseReason, None, CloseReason.RESET]:
                listener.active_count += 1
                listener.connection_finished(Finished(reason), False)
            tallies.append((dict(listener.closed_by_reason), listener.closed_count,
                            listener.bytes_in, listener.bytes_out))
    compiled, pure = tallies
    assert pure[0]["reset"] == 2 and pure[0]["closed"] == 2 and pure[1] == len(CloseReason) + 2
    assert compiled == pure


def listener_pair() -> list[Any]:
    """A compiled and a pure listener of the same config, on sockets bound to loopback."""
    from portside.engine.compiled import CompiledListener

    listeners = []
    for kind in (CompiledListener, Listener):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        listeners.append(kind(ListenerConfig(), sock, owned=False))
    return listeners


def test_both_listeners_bucket_first_bytes_alike() -> None:
    """Time to first byte falls into the same histogram bucket on both engines, at each
    bound, just below and just above it (the compiled engine scans, the pure one bisects)."""
    require(HAVE_COMPILED, "the compiled engine")
    from portside.statistics import TTFB_BUCKETS

    samples = [0.0, 1e-9, 1e9]
    for bound in TTFB_BUCKETS[:-1]:
        samples += [bound * 0.999, bound, bound * 1.001]
    listeners = listener_pair()
    try:
        for listener in listeners:
            for seconds in samples:
                listener.record_first_byte(seconds)
        compiled, pure = ((list(one.ttfb_buckets), one.ttfb_sum) for one in listeners)
        assert compiled == pure
        assert sum(pure[0]) == len(samples) and all(pure[0][:-1])
    finally:
        for listener in listeners:
            listener.sock.close()


def test_the_compiled_constants_are_states_py() -> None:
    """The states, the accept errno sets and the sendmsg batch the compiled engine was built
    with are states.py's, value by value (a stale build after states.py changed fails here)."""
    require(HAVE_COMPILED, "the compiled engine")
    import errno

    from portside.engine import _compiled

    built = _compiled.BUILT_CONSTANTS
    assert built["State"] == {state.name: state.value for state in states.State}
    assert built["SENDMSG_BATCH"] == states.SENDMSG_BATCH
    for name in ("CAPACITY_ERRNOS", "SKIP_ERRNOS"):
        expected: frozenset[int] = getattr(states, name)
        assert {code for code in errno.errorcode
                if _compiled.built_errno_test(name, code)} == expected, name
