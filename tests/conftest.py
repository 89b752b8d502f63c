"""The behaviour-suite harness: real servers on loopback, in a thread, under every engine.

Waiting is always on a condition (a callback recorded, a byte received), never on a sleep. Every
test that starts a server through ``serve`` fails if a handler reported an unexpected error or
if the process holds more file descriptors after the server stopped than before it started.
Every test fails if one of its helper threads died of an exception (an assertion in a client
thread, say), which Python would otherwise only print. In CI (``CI=true``) a missing engine or
tool (uvloop, openssl) fails the tests that need it instead of skipping them.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import shutil
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from portside import (
    CloseReason,
    Connection,
    Engine,
    Handler,
    ListenerConfig,
    Server,
    ServerConfig,
)
from portside.engine import compiled as compiled_engine
from portside.examples.echo import EchoHandler

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None
#: Every engine the behaviour suite runs on; the ``engine`` fixture skips (or, in CI, fails)
#: the ones that cannot run here. ``ENGINES`` lists only those that can.
ALL_ENGINES = ["compiled", "epoll", "asyncio", "uvloop"]
HAVE_COMPILED = compiled_engine.available()
ENGINES = [engine for engine in ALL_ENGINES
           if (engine != "uvloop" or HAVE_UVLOOP) and (engine != "compiled" or HAVE_COMPILED)]
#: CI runs must test everything: there, a missing dependency fails instead of skipping. The one
#: rule for every test (``require``): CI is on when ``CI`` is 1, true or yes (any case); any other
#: value (unset, empty, ``false``, ``0``) is a developer's machine.
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
WAIT = 10.0  # seconds a condition may take before the test fails; generous for a loaded CI box


def require(available: bool, what: str) -> None:
    """Skip the test when ``what`` is missing, or fail it in CI (which installs everything:
    a skip there would hide a broken install)."""
    if available:
        return
    message = f"{what} is missing (scripts/test installs it)"
    if IN_CI:
        pytest.fail(f"{message}; CI=true, so this is a failure, not a skip")
    pytest.skip(message)


def ipv6_loopback_available() -> bool:
    """Whether ``::1`` can be bound here (some containers have no IPv6 at all)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def require_ipv6() -> None:
    """Skip (or in CI fail) a test that needs the IPv6 loopback."""
    require(ipv6_loopback_available(), "the IPv6 loopback (::1)")


def join(thread: threading.Thread, timeout: float = WAIT) -> None:
    """Join a helper thread and fail the test if it is still running after ``timeout``; an
    exception it died of is re-raised here (``HelperThread``) or fails the test at teardown
    (any other thread, through ``thread_failures_fail_the_test``)."""
    thread.join(timeout)
    assert not thread.is_alive(), f"helper thread {thread.name} still running after {timeout} s"
    if isinstance(thread, HelperThread) and thread.failure is not None:
        failure, thread.failure = thread.failure, None  # reported once, here
        raise failure


_helpers: list[HelperThread] = []  # this test's helpers, checked when it ends


class HelperThread(threading.Thread):
    """A test's helper thread whose exception (a failed assertion, say) is re-raised in the
    test by ``join``, with its own traceback, instead of being printed and forgotten."""

    def __init__(self, target: Callable[[], object], name: str = "test-helper") -> None:
        super().__init__(name=name, daemon=True)
        self._body = target
        self.failure: BaseException | None = None
        _helpers.append(self)

    def run(self) -> None:
        try:
            self._body()
        except BaseException as exc:  # re-raised by join(), in the test's thread
            self.failure = exc


def start_helper(target: Callable[[], object], name: str = "test-helper") -> HelperThread:
    """Start ``target`` in a ``HelperThread``; the test must ``join`` it."""
    thread = HelperThread(target, name)
    thread.start()
    return thread


def require_tool(name: str) -> str:
    """The path of a command the test needs; see ``require``."""
    path = shutil.which(name)
    require(path is not None, name)
    assert path is not None
    return path


@pytest.fixture(autouse=True)
def thread_failures_fail_the_test() -> Iterator[None]:
    """An exception that ends a helper thread (a failed assertion in a client thread) fails
    the test it happened in, instead of becoming a warning the run ignores."""
    caught: list[str] = []
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        name = args.thread.name if args.thread is not None else "?"
        caught.append(f"in thread {name}:\n" + "".join(traceback.format_exception(
            args.exc_type, args.exc_value, args.exc_traceback)))

    threading.excepthook = hook
    _helpers.clear()
    try:
        yield
    finally:
        threading.excepthook = previous
    for thread in _helpers:
        thread.join(WAIT)
        if thread.failure is not None:  # a helper whose failure the test never joined
            caught.append(f"in thread {thread.name}: " + "".join(
                traceback.format_exception(thread.failure)))
        elif thread.is_alive():
            caught.append(f"helper thread {thread.name} still running when the test ended")
    _helpers.clear()
    if caught:
        pytest.fail("a helper thread raised " + "\n".join(caught), pytrace=False)


def _warm_up_uvloop() -> None:
    """libuv opens two process-wide descriptors with its first loop and keeps them; open them
    before any test counts descriptors, so the leak check sees only what portside leaks."""
    if HAVE_UVLOOP:
        import asyncio

        import uvloop

        async def nothing() -> None:
            pass

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(nothing())


_warm_up_uvloop()
#: How early a deadline may seem to fire, measured from the test's clock: uvloop's clock counts
#: milliseconds and is read once per loop iteration. A deadline that fires early by any real
#: amount (a tenth of its value, say) still fails the test.
CLOCK_SLACK = 0.02


def assert_on_time(elapsed: float, timeout: float, latest: float | None = None) -> None:
    """``elapsed`` seconds, measured from the event that starts a deadline of ``timeout``
    seconds (designed to fire by ``latest``, ``timeout`` unless the deadline is looked at
    lazily), is on time on both sides: not early beyond the clock's slack, and not late beyond
    some scheduling noise (at most 0.25 s, and never enough to let a deadline 1.5x too long
    pass). Use timeouts of 0.6 s or more, so the noise of a loaded machine stays small."""
    latest = timeout if latest is None else latest
    slack = min(0.3 * timeout, 0.25, 1.45 * timeout - latest)
    assert slack > 0.05, f"a timeout of {timeout} s is too short to bound both sides"
    assert timeout - CLOCK_SLACK <= elapsed < latest + slack, (
        f"a {timeout} s deadline fired after {elapsed:.3f} s; "
        f"expected {timeout - CLOCK_SLACK:.3f} to {latest + slack:.3f} s")


@dataclass
class Event:
    name: str
    conn_id: int | None
    detail: Any = None


class RecordingHandler(EchoHandler):
    """Echoes, and records every callback so tests can wait on and assert about them."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.errors: list[BaseException] = []
        self.closed: dict[int, list[CloseReason]] = {}
        self.made: dict[int, bytes | None] = {}
        self.received: dict[int, bytearray] = {}
        self.expect_errors = False
        self._cond = threading.Condition()

    def record(self, name: str, conn: Connection | None, detail: Any = None) -> None:
        with self._cond:
            self.events.append(Event(name, conn.id if conn is not None else None, detail))
            self._cond.notify_all()

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise AssertionError(f"timed out waiting for {what}; events: {self.events[-20:]}")

    def names(self) -> list[str]:
        with self._cond:
            return [event.name for event in self.events]

    def server_started(self, server: Server) -> None:
        self.record("server_started", None)

    def shutdown_started(self, server: Server) -> None:
        self.record("shutdown_started", None)

    def server_stopped(self, server: Server) -> None:
        self.record("server_stopped", None)

    def connection_made(self, conn: Connection, first_data: memoryview | None) -> None:
        self.made[conn.id] = bytes(first_data) if first_data is not None else None
        self.record("connection_made", conn, self.made[conn.id])
        super().connection_made(conn, first_data)

    def data_received(self, conn: Connection, data: memoryview) -> None:
        self.received.setdefault(conn.id, bytearray()).extend(data)
        super().data_received(conn, data)
        self.record("data_received", conn, len(data))

    def eof_received(self, conn: Connection) -> None:
        self.record("eof_received", conn)
        super().eof_received(conn)

    def write_drained(self, conn: Connection) -> None:
        self.record("write_drained", conn)

    def pause_writing(self, conn: Connection) -> None:
        self.record("pause_writing", conn, conn.write_buffer_size)

    def resume_writing(self, conn: Connection) -> None:
        self.record("resume_writing", conn, conn.write_buffer_size)

    def connection_reset(self, conn: Connection) -> None:
        self.record("connection_reset", conn)

    def connection_closed(self, conn: Connection, reason: CloseReason) -> None:
        with self._cond:
            self.closed.setdefault(conn.id, []).append(reason)
        self.record("connection_closed", conn, reason)

    def error(self, conn: Connection | None, exc: BaseException) -> None:
        with self._cond:
            self.errors.append(exc)
        self.record("error", conn, exc)

    def closed_count(self) -> int:
        with self._cond:
            return len(self.closed)


@dataclass
class RunningServer:
    server: Server
    handler: Any  # a RecordingHandler unless the test brought its own
    thread: threading.Thread
    failure: list[BaseException] = field(default_factory=list)

    def address(self, index: int = 0) -> Any:
        listener = self.server.listeners[index]
        if listener.config.path is not None:
            return listener.config.path
        return (listener.config.host, listener.port)

    def stop(self, drain_timeout: float | None = None) -> None:
        if self.thread.is_alive():
            self.server.shutdown(drain_timeout)
            # The server's own deadlines bound its stop: the drain, then a closing connection's
            # linger (or its flush deadline, 1.25 linger); WAIT on top for a loaded machine.
            config = self.server.config
            drain = config.drain_timeout if drain_timeout is None else drain_timeout
            self.thread.join(drain + 1.25 * config.linger_timeout + WAIT)
        assert not self.thread.is_alive(), "server did not stop"
        assert not self.failure, f"server thread raised: {self.failure!r}"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def require_engine(engine: str) -> None:
    """Skip (or in CI fail) a test on an engine that cannot run here."""
    if engine == "uvloop":
        require(HAVE_UVLOOP, "uvloop (the uvloop engine)")
    if engine == "compiled":
        require(HAVE_COMPILED, "the compiled engine (pip install -e . builds it)")


@pytest.fixture(params=ALL_ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    require_engine(str(request.param))
    return str(request.param)


class Clients:
    """Blocking client sockets that the fixture closes, so the leak check sees only the server."""

    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []

    def connect(self, address: Any, timeout: float = WAIT) -> socket.socket:
        family = socket.AF_UNIX if isinstance(address, str) else (
            socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
        sock = socket.socket(family, socket.SOCK_STREAM)
        self.sockets.append(sock)
        sock.settimeout(timeout)
        sock.connect(address)
        return sock

    def close_all(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()


@pytest.fixture
def clients() -> Iterator[Clients]:
    pool = Clients()
    yield pool
    pool.close_all()


ServeFactory = Callable[..., RunningServer]


@pytest.fixture
def serve(engine: str, clients: Clients) -> Iterator[ServeFactory]:
    """Start servers: ``serve(ListenerConfig(...), ..., handler=..., **server_config)``."""
    running: list[RunningServer] = []
    gc.collect()
    fds_before = open_fds()

    def start(*listeners: ListenerConfig, handler: Handler | None = None,
              **settings: Any) -> RunningServer:
        handler = handler or RecordingHandler()
        config = ServerConfig(engine=Engine(engine), **settings)
        server = Server(handler, listeners or [ListenerConfig()], config)
        server.start()
        failure: list[BaseException] = []

        def body() -> None:
            try:
                server.run(install_signal_handlers=False)
            except BaseException as exc:  # surfaced by RunningServer.stop
                failure.append(exc)

        thread = threading.Thread(target=body, name="portside-test-server", daemon=True)
        thread.start()
        assert server.started.wait(WAIT), "server did not start"
        rs = RunningServer(server, handler, thread, failure)
        running.append(rs)
        return rs

    yield start
    clients.close_all()
    for rs in running:
        rs.stop()
        if not isinstance(rs.handler, RecordingHandler):
            continue  # a test's own handler checks what it needs
        if not rs.handler.expect_errors:
            assert not rs.handler.errors, f"unexpected handler errors: {rs.handler.errors!r}"
        for conn_id, reasons in rs.handler.closed.items():
            assert len(reasons) == 1, f"connection {conn_id} closed {len(reasons)} times"
    gc.collect()
    assert open_fds() <= fds_before, "file descriptors leaked"


def wait_refused(address: tuple[str, int], timeout: float = WAIT) -> None:
    """Wait until a connect to ``address`` is refused: the server has stopped accepting (a
    shutdown or a drain has really begun, not merely been asked for). Nothing notifies a
    client of that, so this re-tries, every 10 ms, until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(address, timeout=timeout).close()
        except ConnectionRefusedError:
            return
        except ConnectionResetError:
            # The connect raced the listening socket's close: the kernel resets what was still
            # in its backlog, which also says the listener is gone.
            return
        assert time.monotonic() < deadline, f"{address} still accepts after {timeout} s"
        time.sleep(0.01)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise AssertionError(f"EOF after {len(chunks)} of {size} bytes")
        chunks.extend(chunk)
    return bytes(chunks)


def recv_until_eof(sock: socket.socket) -> bytes:
    chunks = bytearray()
    while chunk := sock.recv(65536):
        chunks.extend(chunk)
    return bytes(chunks)


def seconds_until_closed(sock: socket.socket, since: float) -> float:
    """Wait for the server to close ``sock`` (FIN or RST, nothing else may arrive first) and
    return how long after ``since`` (a ``time.monotonic()`` reading) that was seen."""
    try:
        data = sock.recv(65536)
    except ConnectionResetError:
        data = b""
    assert data == b"", f"expected the server to close, got {data[:40]!r}"
    return time.monotonic() - since
