"""Several servers on one engine (``IOPool``): one loop thread and one set of pools, while each
server keeps its listeners, handler, statistics, pausing and shutdown. On every engine."""

from __future__ import annotations

import asyncio
import gc
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    WAIT,
    Clients,
    RecordingHandler,
    join,
    open_fds,
    recv_exactly,
    wait_refused,
)

from portside import (
    ConfigError,
    Connection,
    Engine,
    IOPool,
    ListenerConfig,
    Server,
    ServerConfig,
    ServerState,
    ServerStateError,
)


class ThreadNoting(RecordingHandler):
    """Records which thread each connection was made on."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[int] = set()

    def connection_made(self, conn: Connection, first_data: memoryview | None) -> None:
        self.threads.add(threading.get_ident())
        super().connection_made(conn, first_data)


class PoolRun:
    """An IOPool running in a thread; ``stop`` shuts every server down and joins it."""

    def __init__(self, pool: IOPool) -> None:
        self.pool = pool
        self.failure: list[BaseException] = []
        self.thread = threading.Thread(target=self._body, name="portside-test-pool",
                                       daemon=True)

    def _body(self) -> None:
        try:
            self.pool.run(install_signal_handlers=False)
        except BaseException as exc:
            self.failure.append(exc)

    def start(self) -> None:
        self.thread.start()
        assert self.pool.started.wait(WAIT), "the pool did not start"

    def join(self) -> None:
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "the pool's loop did not end"
        assert not self.failure, f"the pool raised {self.failure!r}"


@pytest.fixture
def fds() -> Iterator[None]:
    """The shared engine leaves no descriptor behind."""
    gc.collect()
    before = open_fds()
    yield
    gc.collect()
    assert open_fds() <= before, "file descriptors leaked"


def _address(server: Server) -> tuple[str, int]:
    return ("127.0.0.1", server.listeners[0].port)


def _echo(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload)) == payload


def test_two_servers_share_one_engine_and_stop_one_at_a_time(
        engine: str, clients: Clients, fds: None) -> None:
    pool = IOPool(ServerConfig(engine=Engine(engine), connection_pool_size=4))
    first, second = ThreadNoting(), ThreadNoting()
    server_a = Server(first, [ListenerConfig()], ServerConfig(drain_timeout=5), io_pool=pool)
    server_b = Server(second, [ListenerConfig(), ListenerConfig()], io_pool=pool)
    run = PoolRun(pool)
    run.start()
    try:
        assert server_a.engine is server_b.engine is pool.engine
        a_socks = [clients.connect(_address(server_a)) for _ in range(3)]
        b_sock = clients.connect(_address(server_b))
        for sock in (*a_socks, b_sock):
            _echo(sock, b"hello")
        # One loop thread: both servers' callbacks ran on it.
        assert first.threads == second.threads == {run.thread.ident}
        a_stats, b_stats = server_a.statistics(), server_b.statistics()
        assert a_stats.connection_pool.in_use == b_stats.connection_pool.in_use == 4
        assert a_stats.buffer_pool == b_stats.buffer_pool
        assert sum(entry.active for entry in a_stats.listeners) == 3
        assert sum(entry.active for entry in b_stats.listeners) == 1

        # Shutting one down drains its connections only: their clients finish, then close.
        server_a.shutdown()
        first.wait(lambda: "shutdown_started" in first.names(), "A's shutdown_started")
        _echo(a_socks[0], b"last words")  # a draining connection still converses
        for sock in a_socks:
            sock.close()
        assert server_a.stopped.wait(WAIT)
        assert server_a.state is ServerState.STOPPED
        assert len(first.closed) == 3
        assert all(len(reasons) == 1 for reasons in first.closed.values())
        assert first.names()[-1] == "server_stopped"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(_address(server_a), WAIT).close()
        # The other server serves on: its old connection and new ones.
        assert run.thread.is_alive()
        _echo(b_sock, b"still serving")
        _echo(clients.connect(_address(server_b)), b"new client")
        assert second.names().count("shutdown_started") == 0
        assert not second.closed
    finally:
        pool.shutdown(drain_timeout=0)
        run.join()
        clients.close_all()
    assert server_b.state is ServerState.STOPPED
    assert second.names()[-1] == "server_stopped"
    for handler in (first, second):
        assert not handler.errors
        assert all(len(reasons) == 1 for reasons in handler.closed.values())
        assert handler.names().count("server_stopped") == 1
    assert len(second.closed) == 2
    assert pool.stopped.is_set()


def test_a_server_joins_a_running_pool(engine: str, clients: Clients, fds: None) -> None:
    pool = IOPool(ServerConfig(engine=Engine(engine)))
    first = RecordingHandler()
    server_a = Server(first, [ListenerConfig()], io_pool=pool)
    run = PoolRun(pool)
    run.start()
    try:
        late = RecordingHandler()
        server_c = Server(late, [ListenerConfig()], io_pool=pool)
        server_c.start()
        assert server_c.started.wait(WAIT)
        _echo(clients.connect(_address(server_c)), b"late")
        _echo(clients.connect(_address(server_a)), b"early")
        clients.close_all()
        # The first server stops; the late one keeps the loop alive.
        server_a.shutdown()
        assert server_a.stopped.wait(WAIT)
        _echo(clients.connect(_address(server_c)), b"alone")
        clients.close_all()
        server_c.shutdown()
        run.join()  # the last server stopped: the loop ends by itself
    finally:
        pool.shutdown(drain_timeout=0)
        run.join()
    assert late.names()[0] == "server_started" and late.names()[-1] == "server_stopped"
    assert all(len(reasons) == 1 for reasons in late.closed.values())


def test_pause_and_statistics_stay_per_server(engine: str, clients: Clients, fds: None) -> None:
    pool = IOPool(ServerConfig(engine=Engine(engine)))
    server_a = Server(RecordingHandler(), [ListenerConfig()], io_pool=pool)
    server_b = Server(RecordingHandler(), [ListenerConfig()], io_pool=pool)
    run = PoolRun(pool)
    run.start()
    try:
        server_a.pause_accepting()
        _echo(clients.connect(_address(server_b)), b"b serves")
        assert server_a.statistics().accepting_paused
        assert not server_b.statistics().accepting_paused
        assert server_a.statistics().listeners[0].accepted == 0
        assert server_b.statistics().listeners[0].accepted == 1
        waiting = clients.connect(_address(server_a))  # into A's backlog, not accepted yet
        server_a.resume_accepting()
        _echo(waiting, b"a again")
    finally:
        clients.close_all()
        pool.shutdown(drain_timeout=0)
        run.join()


def test_misuse_is_one_clear_error() -> None:
    pool = IOPool(ServerConfig(engine=Engine.EPOLL))
    server = Server(RecordingHandler(), [ListenerConfig()], io_pool=pool)
    with pytest.raises(ServerStateError, match="run the pool"):
        server.run(install_signal_handlers=False)
    with pytest.raises(ConfigError, match="runs on the pool's engine"):
        Server(RecordingHandler(), [ListenerConfig()], ServerConfig(engine=Engine.ASYNCIO),
               io_pool=pool)
    with pytest.raises(ConfigError, match="at least one server"):
        IOPool().run(install_signal_handlers=False)


def test_a_pool_serves_from_a_running_asyncio_loop(clients: Clients, fds: None) -> None:
    pool = IOPool(ServerConfig(engine=Engine.ASYNCIO))
    handlers = [RecordingHandler(), RecordingHandler()]
    servers = [Server(handler, [ListenerConfig()], io_pool=pool) for handler in handlers]
    thread = threading.Thread(target=asyncio.run, args=(pool.serve(),), daemon=True)
    thread.start()
    try:
        assert pool.started.wait(WAIT)
        for server in servers:
            _echo(clients.connect(_address(server)), b"from asyncio")
    finally:
        clients.close_all()
        pool.shutdown(drain_timeout=0)
        join(thread)
    assert not thread.is_alive()
    assert [handler.names()[-1] for handler in handlers] == ["server_stopped"] * 2


POOL_SCRIPT = """
import logging, sys
from portside import IOPool, ListenerConfig, Server, ServerConfig
from portside.examples.echo import EchoHandler
from portside.examples.resp import RespHandler

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
pool = IOPool(ServerConfig(engine=sys.argv[1]))
Server(EchoHandler(), [ListenerConfig()], io_pool=pool)
Server(RespHandler(), [ListenerConfig()], io_pool=pool)
pool.run()
print("pool stopped", file=sys.stderr)
"""


def test_sigterm_stops_every_server_of_a_pool(engine: str, tmp_path: Path) -> None:
    """``pool.run()`` on the main thread: SIGTERM shuts every server down, and the process
    ends cleanly; a client mid-conversation is answered first."""
    script = tmp_path / "pool.py"
    script.write_text(POOL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), engine], stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stderr is not None
        ports: list[int] = []
        while len(ports) < 2:
            line = proc.stderr.readline()
            assert line, "the pool's process ended before listening"
            if match := re.search(r"listening on 127\.0\.0\.1:(\d+)", line):
                ports.append(int(match.group(1)))
        with socket.create_connection(("127.0.0.1", ports[0]), WAIT) as echo, \
                socket.create_connection(("127.0.0.1", ports[1]), WAIT) as resp:
            _echo(echo, b"before")
            resp.sendall(b"PING\r\n")
            assert recv_exactly(resp, 7) == b"+PONG\r\n"
            proc.send_signal(signal.SIGTERM)
            wait_refused(("127.0.0.1", ports[0]))  # the SIGTERM was handled: draining now
            # Draining: the open connections still converse, until their clients leave.
            _echo(echo, b"during")
        rest = proc.stderr.read()
        assert proc.wait(WAIT) == 0
        assert "pool stopped" in rest and "Traceback" not in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
        if proc.stderr is not None:
            proc.stderr.close()
