"""``accepting_stopped`` / ``accepting_started`` (the article's OnStopAcceptingConnections and
OnStartAcceptingConnections): called exactly when a listener stops or starts accepting, with
the reason, on real sockets under every engine; EMFILE back-off in a process with a low
RLIMIT_NOFILE."""

from __future__ import annotations

import itertools
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from conftest import WAIT, Clients, RecordingHandler, ServeFactory, recv_exactly

from portside import AcceptingReason, AcceptPolicy, ListenerConfig, ListenerView

R = AcceptingReason


class AcceptingHandler(RecordingHandler):
    def accepting_stopped(self, listener: ListenerView, reason: AcceptingReason) -> None:
        self.record("accepting", None, ("stopped", reason))

    def accepting_started(self, listener: ListenerView, reason: AcceptingReason) -> None:
        self.record("accepting", None, ("started", reason))

    def changes(self) -> list[tuple[str, AcceptingReason]]:
        with self._cond:
            return [event.detail for event in self.events if event.name == "accepting"]

    def wait_changes(self, expected: list[tuple[str, AcceptingReason]]) -> None:
        self.wait(lambda: len(self.changes()) >= len(expected), f"accepting changes {expected}")
        assert self.changes() == expected


def echo(clients: Clients, address: Any) -> socket.socket:
    client = clients.connect(address)
    client.sendall(b"hi")
    assert recv_exactly(client, 2) == b"hi"
    return client


def test_start_and_shutdown(serve: ServeFactory) -> None:
    handler = AcceptingHandler()
    running = serve(ListenerConfig(), handler=handler)
    handler.wait_changes([("started", R.START)])
    running.stop()
    assert handler.changes() == [("started", R.START), ("stopped", R.SHUTDOWN)]


def test_pause_and_resume_once_each(serve: ServeFactory, clients: Clients) -> None:
    handler = AcceptingHandler()
    running = serve(ListenerConfig(), handler=handler)
    handler.wait_changes([("started", R.START)])
    running.server.pause_accepting()
    running.server.pause_accepting()  # no change: no second call
    handler.wait_changes([("started", R.START), ("stopped", R.PAUSED)])
    running.server.resume_accepting()
    echo(clients, running.address())  # served after the resume, so the call came first
    assert handler.changes() == [("started", R.START), ("stopped", R.PAUSED),
                                 ("started", R.RESUMED)]


def test_ceiling_then_below_it(serve: ServeFactory, clients: Clients) -> None:
    handler = AcceptingHandler()
    running = serve(ListenerConfig(max_connections=1), handler=handler)
    first = echo(clients, running.address())
    handler.wait_changes([("started", R.START), ("stopped", R.CEILING)])
    second = clients.connect(running.address())  # waits in the backlog
    second.sendall(b"yo")
    first.close()  # below the ceiling: the second is accepted, and the ceiling is hit again
    assert recv_exactly(second, 2) == b"yo"
    handler.wait_changes([("started", R.START), ("stopped", R.CEILING),
                          ("started", R.BELOW_CEILING), ("stopped", R.CEILING)])
    second.close()
    handler.wait_changes([("started", R.START), ("stopped", R.CEILING),
                          ("started", R.BELOW_CEILING), ("stopped", R.CEILING),
                          ("started", R.BELOW_CEILING)])


def test_paused_at_the_ceiling_resumes_once_below_it(serve: ServeFactory,
                                                     clients: Clients) -> None:
    """While stopped, a change of reason is no change: stopped at the ceiling, paused, back
    below the ceiling (still paused), then resumed: one stop and one start (resumed)."""
    handler = AcceptingHandler()
    running = serve(ListenerConfig(max_connections=1), handler=handler)
    first = echo(clients, running.address())
    handler.wait_changes([("started", R.START), ("stopped", R.CEILING)])
    paused = threading.Event()

    def pause() -> None:  # on the loop, so known to come before the close is seen
        running.server.pause_accepting()
        paused.set()

    running.server.call_soon_threadsafe(pause)
    assert paused.wait(WAIT)
    first.close()
    handler.wait(lambda: handler.closed_count() == 1, "the first connection's end")
    running.server.resume_accepting()
    echo(clients, running.address())
    assert handler.changes()[:3] == [("started", R.START), ("stopped", R.CEILING),
                                     ("started", R.RESUMED)]


def test_eviction_of_a_stale_pending_connection(serve: ServeFactory, clients: Clients) -> None:
    """At the ceiling with a silent data-first connection: a new client makes portside evict
    it once stale, which is a start below the ceiling, and the new one fills it again."""
    handler = AcceptingHandler()
    running = serve(ListenerConfig(policy=AcceptPolicy.DATA_FIRST, max_connections=1,
                                   defer_accept=0, stale_pending_age=0.2), handler=handler)
    clients.connect(running.address())  # silent: pending until evicted
    handler.wait_changes([("started", R.START), ("stopped", R.CEILING)])
    echo(clients, running.address())
    handler.wait_changes([("started", R.START), ("stopped", R.CEILING),
                          ("started", R.BELOW_CEILING), ("stopped", R.CEILING)])
    assert running.server.statistics().listeners[0].evicted == 1


def test_a_raising_callback_is_reported_and_harmless(serve: ServeFactory,
                                                     clients: Clients) -> None:
    class Raising(RecordingHandler):
        def accepting_started(self, listener: ListenerView, reason: AcceptingReason) -> None:
            raise RuntimeError("oops")

    handler = Raising()
    handler.expect_errors = True
    running = serve(ListenerConfig(), handler=handler)
    echo(clients, running.address())
    handler.wait(lambda: len(handler.errors) == 1, "the report")
    assert [event.conn_id for event in handler.events if event.name == "error"] == [None]


# -- EMFILE: a server process with few descriptors to spare -------------------------------------

EMFILE_SERVER = r"""
import os, resource, socket, sys, threading
from portside import Engine, Handler, ListenerConfig, Server, ServerConfig

class Echo(Handler):
    def data_received(self, conn, data):
        conn.write(data)

    def accepting_stopped(self, listener, reason):
        print("stopped", reason.value, flush=True)

    def accepting_started(self, listener, reason):
        print("started", reason.value, flush=True)

server = Server(Echo(), [ListenerConfig()],
                ServerConfig(engine=Engine(sys.argv[1]), accept_backoff=0.05))
server.start()
threading.Thread(target=server.run, kwargs={"install_signal_handlers": False},
                 daemon=True).start()
assert server.started.wait(10)
port = server.listeners[0].port
warm = socket.create_connection(("127.0.0.1", port))  # first-use imports, before the limit
warm.sendall(b"w")
assert warm.recv(1) == b"w"
warm.close()
open_now = len(os.listdir("/proc/self/fd")) - 1  # less the listdir's own descriptor
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 2, hard))  # room for two connections
print("ready", port, flush=True)
sys.stdin.readline()
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
server.shutdown(1.0)
"""


class Lines:
    """A process's stdout, line by line, waited on with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.strip())
        self._queue.put(None)

    def wait_for(self, prefix: str) -> str:
        deadline = time.monotonic() + WAIT
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line {prefix!r}; saw {self.seen[-10:]}") from None
            if line is None:
                raise AssertionError(f"process ended before {prefix!r}; saw {self.seen[-10:]}")
            self.seen.append(line)
            if line.startswith(prefix):
                return line


def test_emfile_backs_off_and_starts_again(engine: str, clients: Clients) -> None:
    proc = subprocess.Popen([sys.executable, "-c", EMFILE_SERVER, engine],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        lines = Lines(proc)
        port = int(lines.wait_for("ready").split()[1])
        held = [echo(clients, ("127.0.0.1", port)) for _ in range(2)]
        waiting = clients.connect(("127.0.0.1", port))  # its accept fails with EMFILE
        waiting.sendall(b"ok")
        lines.wait_for("stopped backoff")
        lines.wait_for("started backoff-over")
        held[0].close()  # a descriptor free: the next try accepts the waiting client
        assert recv_exactly(waiting, 2) == b"ok"
        changes = [line for line in lines.seen if line.startswith(("started", "stopped"))]
        assert changes[0] == "started start"
        for before, after in itertools.pairwise(changes):
            assert before.split()[0] != after.split()[0], changes  # strictly alternating
        assert set(changes[1:]) <= {"stopped backoff", "started backoff-over"}, changes
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
