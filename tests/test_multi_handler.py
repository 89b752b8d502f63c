"""A handler per listener: one server speaking a protocol per port, on every engine; and
``portside serve`` with ``--listen ADDRESS=MODULE:CLASS``, in one process and with workers."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import (
    HAVE_UVLOOP,
    WAIT,
    Clients,
    RecordingHandler,
    ServeFactory,
    join,
    recv_exactly,
    recv_until_eof,
)
from proc import PortsideProcess

from portside import (
    AcceptingReason,
    CloseReason,
    ConfigError,
    Connection,
    Engine,
    ListenerConfig,
    ListenerView,
    Server,
    ServerConfig,
    StreamHandler,
    StreamReader,
    StreamWriter,
)
from portside.config import parse_listen
from portside.examples.echo import EchoHandler


class Shouter(RecordingHandler):
    """Answers in capitals, and says goodbye at the peer's EOF: overrides ``eof_received``
    where the server's handler leaves Handler's default (the compiled engine inlines a
    default, so it must look at the listener's handler, not the server's)."""

    def data_received(self, conn: Connection, data: memoryview) -> None:
        self.received.setdefault(conn.id, bytearray()).extend(data)
        conn.write(bytes(data).upper())
        self.record("data_received", conn, len(data))

    def eof_received(self, conn: Connection) -> None:
        self.record("eof_received", conn)
        conn.write(b"BYE")
        conn.close()


class Failing(RecordingHandler):
    def data_received(self, conn: Connection, data: memoryview) -> None:
        raise RuntimeError("shouter's bug")


def test_each_listener_is_served_by_its_own_handler(serve: ServeFactory,
                                                     clients: Clients) -> None:
    shouter = Shouter()
    plain = EchoHandler()  # every callback Handler's default but data_received
    running = serve(ListenerConfig(), ListenerConfig(handler=shouter), handler=plain)
    echo_sock = clients.connect(running.address(0))
    loud_sock = clients.connect(running.address(1))
    echo_sock.sendall(b"hello")
    loud_sock.sendall(b"hello")
    assert recv_exactly(echo_sock, 5) == b"hello"
    assert recv_exactly(loud_sock, 5) == b"HELLO"
    echo_sock.shutdown(socket.SHUT_WR)
    loud_sock.shutdown(socket.SHUT_WR)
    assert recv_until_eof(echo_sock) == b""  # Handler's eof_received: close
    assert recv_until_eof(loud_sock) == b"BYE"  # the listener's handler's own
    shouter.wait(lambda: shouter.closed_count() == 1, "the shouter's connection_closed")
    running.stop()
    assert shouter.names().count("server_started") == 1
    assert shouter.names().count("shutdown_started") == 1
    assert shouter.names()[-1] == "server_stopped"
    assert [len(reasons) for reasons in shouter.closed.values()] == [1]
    assert not shouter.errors


def test_server_callbacks_go_once_to_each_distinct_handler(serve: ServeFactory,
                                                            clients: Clients) -> None:
    main, other = RecordingHandler(), RecordingHandler()
    running = serve(ListenerConfig(), ListenerConfig(handler=other),
                    ListenerConfig(handler=main), ListenerConfig(handler=other), handler=main)
    for index in range(4):
        sock = clients.connect(running.address(index))
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
    main.wait(lambda: main.names().count("connection_made") == 2, "two connections on main")
    other.wait(lambda: other.names().count("connection_made") == 2, "two on the other")
    clients.close_all()
    running.stop()
    for handler in (main, other):
        names = handler.names()
        assert [names.count(name) for name in ("server_started", "shutdown_started",
                                               "server_stopped")] == [1, 1, 1]
        assert names[0] == "server_started" and names[-1] == "server_stopped"
        assert len(handler.closed) == 2
        assert all(len(reasons) == 1 for reasons in handler.closed.values())


def test_errors_go_to_the_listeners_handler(serve: ServeFactory, clients: Clients) -> None:
    failing = Failing()
    failing.expect_errors = True
    running = serve(ListenerConfig(), ListenerConfig(handler=failing))
    sock = clients.connect(running.address(1))
    sock.sendall(b"boom")
    failing.wait(lambda: failing.closed_count() == 1, "the failing connection closed")
    assert [str(exc) for exc in failing.errors] == ["shouter's bug"]
    assert next(iter(failing.closed.values())) == [CloseReason.HANDLER_ERROR]
    assert not running.handler.errors  # the server's handler heard nothing of it
    good = clients.connect(running.address(0))
    good.sendall(b"still here")
    assert recv_exactly(good, 10) == b"still here"


class Hooked(RecordingHandler):
    """Overrides the listener-level hooks: they too belong to the listener's own handler."""

    def socket_accepted(self, listener: ListenerView, sock: socket.socket) -> None:
        self.record("socket_accepted", None, listener.address)

    def accepting_started(self, listener: ListenerView, reason: AcceptingReason) -> None:
        self.record("accepting_started", None, reason)

    def accepting_stopped(self, listener: ListenerView, reason: AcceptingReason) -> None:
        self.record("accepting_stopped", None, reason)


def test_listener_hooks_go_to_the_listeners_handler(serve: ServeFactory,
                                                    clients: Clients) -> None:
    own, main = Hooked(), Hooked()
    running = serve(ListenerConfig(), ListenerConfig(handler=own), handler=main)
    own.wait(lambda: "accepting_started" in own.names(), "accepting_started (own)")
    main.wait(lambda: "accepting_started" in main.names(), "accepting_started (main)")
    for index in (0, 1):
        sock = clients.connect(running.address(index))
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
    addresses = [listener.address for listener in running.server.listeners]

    def accepted(handler: Hooked) -> list[Any]:
        return [e.detail for e in handler.events if e.name == "socket_accepted"]

    assert accepted(main) == [addresses[0]] and accepted(own) == [addresses[1]]
    assert main.names().count("accepting_started") == 1
    assert own.names().count("accepting_started") == 1
    clients.close_all()
    running.stop()
    assert own.names().count("accepting_stopped") == 1
    assert main.names().count("accepting_stopped") == 1


def test_a_server_without_a_handler_of_its_own(serve: ServeFactory, clients: Clients,
                                               engine: str) -> None:
    shouter = Shouter()
    server = Server(None, [ListenerConfig(handler=shouter)], ServerConfig(engine=Engine(engine)))
    thread = threading.Thread(target=server.run, kwargs={"install_signal_handlers": False})
    thread.start()
    try:
        assert server.started.wait(WAIT)
        sock = clients.connect(("127.0.0.1", server.listeners[0].port))
        sock.sendall(b"abc")
        assert recv_exactly(sock, 3) == b"ABC"
    finally:
        server.shutdown(drain_timeout=0)
        join(thread)
    assert not thread.is_alive()
    assert shouter.names()[-1] == "server_stopped"


def test_a_listener_must_have_a_handler_instance() -> None:
    with pytest.raises(ConfigError, match="has no handler"):
        Server(None, [ListenerConfig(), ListenerConfig(handler=EchoHandler())])
    with pytest.raises(ConfigError, match=r"is the text 'a\.b:C'"):
        Server(EchoHandler(), [ListenerConfig(handler="a.b:C")])


class AsyncUpper(StreamHandler):
    async def handle(self, reader: StreamReader, writer: StreamWriter) -> None:
        while data := await reader.read(4096):
            writer.write(data.upper())
            await writer.drain()


def test_a_coroutine_handler_beside_a_plain_one_runs_the_asyncio_engine(
        clients: Clients) -> None:
    """One listener's handler runs coroutines: ``auto`` picks uvloop (or asyncio) for the whole
    server, where the plain handler runs unchanged."""
    server = Server(EchoHandler(), [ListenerConfig(), ListenerConfig(handler=AsyncUpper())])
    assert server.engine is (Engine.UVLOOP if HAVE_UVLOOP else Engine.ASYNCIO)
    thread = threading.Thread(target=server.run, kwargs={"install_signal_handlers": False})
    thread.start()
    try:
        assert server.started.wait(WAIT)
        plain = clients.connect(("127.0.0.1", server.listeners[0].port))
        coroutine = clients.connect(("127.0.0.1", server.listeners[1].port))
        plain.sendall(b"plain")
        coroutine.sendall(b"async")
        assert recv_exactly(plain, 5) == b"plain"
        assert recv_exactly(coroutine, 5) == b"ASYNC"
    finally:
        server.shutdown(drain_timeout=0)
        join(thread)
    assert not thread.is_alive()


@pytest.mark.parametrize("engine", [Engine.EPOLL, Engine.COMPILED])
def test_epoll_engines_refuse_a_coroutine_handler_on_any_listener(engine: Engine) -> None:
    server = Server(EchoHandler(), [ListenerConfig(), ListenerConfig(handler=AsyncUpper())],
                    ServerConfig(engine=engine))
    with pytest.raises(ConfigError, match="AsyncUpper runs coroutines"):
        server.run(install_signal_handlers=False)
    for listener in server._engine_listeners:
        listener.close()


# -- the command line ----------------------------------------------------------------------------


def test_listen_takes_a_handler_after_an_equals_sign() -> None:
    listener = parse_listen("data-first@127.0.0.1:6379=portside.examples.resp:RespHandler")
    assert (listener.port, listener.policy.value, listener.handler) == (
        6379, "data-first", "portside.examples.resp:RespHandler")
    assert parse_listen("[::1]:7=pkg.mod:Cls").host == "::1"
    assert parse_listen(":7").handler is None
    assert parse_listen("unix:/tmp/a=b.sock").path == "/tmp/a=b.sock"  # not MODULE:CLASS
    assert parse_listen("unix:/tmp/x.sock=m:C").handler == "m:C"
    with pytest.raises(ConfigError):
        parse_listen("127.0.0.1:99999=m:C")


def _ports_by_handler(proc: PortsideProcess, count: int) -> dict[str, int]:
    """Listening ports by handler class, from the start-up lines ("listening on ... for X")."""
    found: dict[str, int] = {}
    while len(found) < count:
        match = proc.wait_for(r"listening on 127\.0\.0\.1:(\d+) \([\w-]+\) for (\w+)")
        found[match.group(2)] = int(match.group(1))
    return found


@pytest.mark.parametrize("workers", [None, 2])
def test_serve_runs_resp_and_echo_in_one_process(workers: int | None, tmp_path: Path) -> None:
    args = ["serve", "--listen", "127.0.0.1:0=portside.examples.resp:RespHandler",
            "--listen", "data-first@127.0.0.1:0=portside.examples.echo:EchoHandler",
            "--control", str(tmp_path / "ctl.sock")]
    if workers:
        args += ["--workers", str(workers)]
    proc = PortsideProcess(args)
    try:
        ports = _ports_by_handler(proc, 2)
        if workers:
            proc.wait_for(r"serving .* with 2 worker\(s\)", seen_too=True)
        client = redis.Redis(host="127.0.0.1", port=ports["RespHandler"],
                             socket_timeout=WAIT)
        try:
            assert client.ping() is True
            assert client.set("greeting", "hello") is True
            assert client.get("greeting") == b"hello"
            assert client.incr("n") == 1
        finally:
            client.close()
        with socket.create_connection(("127.0.0.1", ports["EchoHandler"]), WAIT) as sock:
            sock.sendall(b"echo me")
            assert recv_exactly(sock, 7) == b"echo me"
        proc.signal(signal.SIGTERM)
        assert proc.wait_exit() == 0
    finally:
        proc.kill()


def test_serve_default_handler_and_per_listener_handler(tmp_path: Path) -> None:
    """The MODULE:CLASS argument serves every --listen without one of its own."""
    proc = PortsideProcess(["serve", "portside.examples.echo:EchoHandler",
                            "--listen", "127.0.0.1:0",
                            "--listen", "127.0.0.1:0=portside.examples.resp:RespHandler",
                            "--control", str(tmp_path / "ctl.sock")])
    try:
        ports = _ports_by_handler(proc, 2)
        client = redis.Redis(host="127.0.0.1", port=ports["RespHandler"], socket_timeout=WAIT)
        try:
            assert client.echo("hi") == b"hi"
        finally:
            client.close()
        with socket.create_connection(("127.0.0.1", ports["EchoHandler"]), WAIT) as sock:
            sock.sendall(b"ping")
            assert recv_exactly(sock, 4) == b"ping"
        proc.signal(signal.SIGTERM)
        assert proc.wait_exit() == 0
    finally:
        proc.kill()


def test_serve_without_any_handler_is_one_line(tmp_path: Path) -> None:
    proc = PortsideProcess(["serve", "--listen", "127.0.0.1:0=portside.examples.echo:EchoHandler",
                            "--listen", "127.0.0.1:0", "--control", str(tmp_path / "c.sock")])
    try:
        assert proc.wait_exit() == 2
        assert "127.0.0.1:0 has no handler" in proc.text()
        assert "Traceback" not in proc.text()
    finally:
        proc.kill()


class Refuser(EchoHandler):
    """Aborts every connection at once, leaving ``connection_closed`` as Handler has it."""

    def __init__(self) -> None:
        self.aborted = threading.Event()

    def connection_made(self, conn: Connection, first_data: memoryview | None) -> None:
        conn.abort()
        self.aborted.set()


def test_a_reused_connection_object_serves_its_new_listeners_handler(
        serve: ServeFactory, clients: Clients) -> None:
    """A connection object that served one listener's handler, then taken from the pool for
    a connection another listener takes from its backlog at shutdown, calls that listener's
    ``connection_closed`` (the compiled engine must not keep the first handler's inlined
    defaults)."""
    refuser, recording = Refuser(), RecordingHandler()
    running = serve(ListenerConfig(), ListenerConfig(handler=recording), handler=refuser,
                    linger_timeout=0.1)
    # The refuser aborts at once: the reset may reach the client before connect() returns,
    # which is then what the client sees. Either way the first connection was served.
    with contextlib.suppress(ConnectionResetError):
        clients.connect(running.address(0))
    assert refuser.aborted.wait(WAIT)
    clients.close_all()
    running.server.pause_accepting()
    barrier = threading.Event()
    running.server.call_soon_threadsafe(barrier.set)  # after the pause, and the recycling
    assert barrier.wait(WAIT)
    clients.connect(running.address(1))  # waits in the backlog: accepting is paused
    running.stop(drain_timeout=0)
    assert len(recording.closed) == 1
    assert [len(reasons) for reasons in recording.closed.values()] == [1]
    assert recording.names()[-1] == "server_stopped"


ASYNC_APP = '''
from portside import StreamHandler


class Echo(StreamHandler):
    async def handle(self, reader, writer):
        writer.write(await reader.read(100))
'''


def test_the_supervisor_names_the_engine_its_workers_run(tmp_path: Path) -> None:
    """Only workers import the handlers, and a coroutine handler makes ``auto`` mean an
    asyncio loop: the start-up line says what the workers report, not the configured rule."""
    (tmp_path / "asyncapp.py").write_text(ASYNC_APP)
    expected = "uvloop" if HAVE_UVLOOP else "asyncio"
    proc = PortsideProcess(["serve", "asyncapp:Echo", "--listen", "127.0.0.1:0", "--workers",
                            "2", "--control", str(tmp_path / "ctl.sock")], cwd=tmp_path)
    try:
        port = int(proc.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        proc.wait_for(rf"serving asyncapp:Echo with 2 worker\(s\): engine {expected},",
                      seen_too=True)
        with socket.create_connection(("127.0.0.1", port), WAIT) as sock:
            sock.sendall(b"hi")
            assert recv_exactly(sock, 2) == b"hi"
        proc.signal(signal.SIGTERM)
        assert proc.wait_exit() == 0
    finally:
        proc.kill()
