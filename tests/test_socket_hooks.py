"""The accepted socket is the handler's to shape: per-listener socket options, seen through
getsockopt on the server's side, ``Handler.socket_accepted``, and a peer that vanishes without
a FIN found by keepalive or TCP_USER_TIMEOUT (in a private network namespace whose loopback is
taken down, so no packet, FIN or RST, reaches either side)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest
from conftest import Clients, RecordingHandler, ServeFactory, recv_exactly, require

from portside import CloseReason, Connection, ErrorOrigin, ListenerConfig, ListenerView
from portside.engine.listener import socket_options
from portside.errors import ConfigError
from portside.settings import add_flags, resolve

#: What the hook reads back from each accepted socket: (level, option) by name.
WATCHED = {
    "nodelay": (socket.IPPROTO_TCP, socket.TCP_NODELAY),
    "keepalive": (socket.SOL_SOCKET, socket.SO_KEEPALIVE),
    "keepidle": (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
    "keepintvl": (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
    "keepcnt": (socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    "user_timeout": (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
    "rcvbuf": (socket.SOL_SOCKET, socket.SO_RCVBUF),
    "sndbuf": (socket.SOL_SOCKET, socket.SO_SNDBUF),
}


class ShapingHandler(RecordingHandler):
    """Records what each accepted socket's options are when the hook sees it; raises, or
    closes the socket, for the clients the test says."""

    def __init__(self, fail: bool = False, close: bool = False, tcp: bool = True) -> None:
        super().__init__()
        self.fail, self.close_it, self.tcp = fail, close, tcp
        self.seen: list[dict[str, Any]] = []
        self.origins: list[ErrorOrigin] = []

    def socket_accepted(self, listener: ListenerView, sock: socket.socket) -> None:
        names = WATCHED if self.tcp else {key: WATCHED[key] for key in ("rcvbuf", "sndbuf")}
        options: dict[str, Any] = {name: sock.getsockopt(*where)
                                   for name, where in names.items()}
        options["listener"] = listener.address
        options["blocking"] = sock.getblocking()
        self.record("socket_accepted", None, options)
        with self._cond:
            self.seen.append(options)
        if self.close_it:
            sock.close()
        if self.fail:
            raise ValueError("the hook refused this one")

    def error(self, conn: Connection | None, exc: BaseException, *,
              origin: ErrorOrigin = ErrorOrigin.CALLBACK) -> None:
        with self._cond:
            self.origins.append(origin)
        super().error(conn, exc)


def test_the_settings_read_as_users_write_them() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    flags = parser.parse_args(["--no-tcp-nodelay", "--so-keepalive", "30m::5",
                               "--tcp-user-timeout", "20", "--rcvbuf", "262144"])
    resolved = resolve(flags, {"PORTSIDE_SNDBUF": "65536", "PORTSIDE_SO_KEEPALIVE": "on"})
    assert resolved.listener == {"tcp_nodelay": False, "so_keepalive": "1800::5",
                                 "tcp_user_timeout": 20.0, "rcvbuf": 262_144,
                                 "sndbuf": 65_536}
    config = ListenerConfig(**resolved.listener)
    assert socket_options(config, tcp=True) == (
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1800),
        (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 5),
        (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 20_000),
        (socket.SOL_SOCKET, socket.SO_RCVBUF, 262_144),
        (socket.SOL_SOCKET, socket.SO_SNDBUF, 65_536))
    assert socket_options(config, tcp=False) == (
        (socket.SOL_SOCKET, socket.SO_RCVBUF, 262_144),
        (socket.SOL_SOCKET, socket.SO_SNDBUF, 65_536))
    assert socket_options(ListenerConfig(), tcp=True) == ()  # the defaults cost nothing


@pytest.mark.parametrize(("name", "value"), [
    ("so_keepalive", "1:2"), ("so_keepalive", "0:1:1"), ("so_keepalive", "1:1:128"),
    ("so_keepalive", "40000::"), ("so_keepalive", "m::"), ("tcp_user_timeout", 0.0001),
    ("tcp_user_timeout", 3_000_000.0), ("rcvbuf", -1), ("sndbuf", 2**31)])
def test_bad_values_are_one_clear_error(name: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=name):
        ListenerConfig(**{name: value})


def echo_once(clients: Clients, address: Any, payload: bytes = b"ping") -> None:
    client = clients.connect(address)
    client.sendall(payload)
    assert recv_exactly(client, len(payload)) == payload


def test_defaults_set_nodelay_only(serve: ServeFactory, clients: Clients) -> None:
    handler = ShapingHandler()
    server = serve(ListenerConfig(), handler=handler)
    echo_once(clients, server.address())
    seen = handler.seen[0]
    assert seen["nodelay"] == 1
    assert seen["keepalive"] == 0
    assert seen["user_timeout"] == 0
    assert seen["listener"] == server.server.listeners[0].address


def test_configured_options_are_on_the_accepted_socket(serve: ServeFactory,
                                                       clients: Clients) -> None:
    handler = ShapingHandler()
    server = serve(ListenerConfig(tcp_nodelay=False, so_keepalive="7:3:4", tcp_user_timeout=2.5,
                         rcvbuf=65_536, sndbuf=131_072), handler=handler)
    echo_once(clients, server.address())
    seen = handler.seen[0]
    assert seen["nodelay"] == 0
    assert (seen["keepalive"], seen["keepidle"], seen["keepintvl"], seen["keepcnt"]) == (
        1, 7, 3, 4)
    assert seen["user_timeout"] == 2500
    # Linux doubles the size asked for (its bookkeeping overhead), and reports that.
    assert seen["rcvbuf"] == 2 * 65_536
    assert seen["sndbuf"] == 2 * 131_072
    assert seen["blocking"] is False  # portside's own shaping happened first


def test_keepalive_on_keeps_the_kernels_timings(serve: ServeFactory, clients: Clients) -> None:
    handler = ShapingHandler()
    server = serve(ListenerConfig(so_keepalive="on"), handler=handler)
    echo_once(clients, server.address())
    seen = handler.seen[0]
    kernel_idle = int(Path("/proc/sys/net/ipv4/tcp_keepalive_time").read_text())
    assert (seen["keepalive"], seen["keepidle"]) == (1, kernel_idle)


def test_what_the_hook_sets_stays_set(serve: ServeFactory, clients: Clients) -> None:
    """The hook may shape the socket itself: what it sets is what the connection runs with."""

    class Hook(RecordingHandler):
        def socket_accepted(self, listener: ListenerView, sock: socket.socket) -> None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 9)

        def connection_made(self, conn: Connection, first_data: memoryview | None) -> None:
            fd = cast(Any, conn)._sock.fileno()  # the engine's own socket, for the test
            probe = socket.socket(fileno=os.dup(fd))
            try:
                self.record("keepcnt", conn, probe.getsockopt(socket.IPPROTO_TCP,
                                                              socket.TCP_KEEPCNT))
            finally:
                probe.close()
            super().connection_made(conn, first_data)

    handler = Hook()
    server = serve(ListenerConfig(), handler=handler)
    echo_once(clients, server.address())
    assert [event.detail for event in handler.events if event.name == "keepcnt"] == [9]


def test_a_hook_that_raises_resets_that_connection_only(serve: ServeFactory,
                                                        clients: Clients) -> None:
    handler = ShapingHandler(fail=True)
    handler.expect_errors = True
    server = serve(ListenerConfig(), handler=handler)
    # The reset can arrive before connect() returns (it then raises), or at the first send or
    # receive: all three are inside the raises block, and a FIN is still a failure.
    with pytest.raises(ConnectionResetError):
        refused = clients.connect(server.address())
        refused.sendall(b"x")
        if refused.recv(1) == b"":
            raise AssertionError("expected a reset, got a FIN")
    handler.wait(lambda: len(handler.errors) == 1, "the hook's error")
    assert isinstance(handler.errors[0], ValueError)
    assert handler.origins == [ErrorOrigin.SOCKET_HOOK]
    assert [event.conn_id for event in handler.events if event.name == "error"] == [None]
    assert not handler.closed  # never a connection: no connection_closed
    handler.fail = False
    echo_once(clients, server.address())  # the listener goes on
    stats = server.server.statistics().listeners[0]
    assert stats.closed_by_reason.get(CloseReason.HANDLER_ERROR.value) == 1
    assert stats.accepted == 2


def test_a_hook_that_closes_the_socket_is_reported(serve: ServeFactory,
                                                   clients: Clients) -> None:
    handler = ShapingHandler(close=True)
    handler.expect_errors = True
    server = serve(ListenerConfig(), handler=handler)
    client = clients.connect(server.address())
    handler.wait(lambda: len(handler.errors) == 1, "the report")
    assert "closed the accepted socket" in str(handler.errors[0])
    assert handler.origins == [ErrorOrigin.SOCKET_HOOK]
    assert client.recv(1) == b""  # the hook's close() sent a FIN; nothing else happened
    handler.close_it = False
    echo_once(clients, server.address())


@pytest.mark.parametrize("failure", ["raises", "closes"])
def test_a_failed_hook_gives_back_the_clients_slot(serve: ServeFactory, clients: Clients,
                                                   failure: str) -> None:
    """Issue 21, item 4: the per-client limits admit at accept, before the hook runs; a hook
    that raised (or closed the socket) kept its client's place, and with
    max_connections_per_client=1 that client was refused for good."""
    handler = ShapingHandler(fail=failure == "raises", close=failure == "closes")
    handler.expect_errors = True
    server = serve(ListenerConfig(max_connections_per_client=1), handler=handler)
    with contextlib.suppress(ConnectionError):  # the reset may come before connect returns
        refused = clients.connect(server.address())
        refused.sendall(b"x")
        refused.recv(1)
    handler.wait(lambda: len(handler.errors) == 1, "the hook's failure")
    handler.fail = handler.close_it = False
    echo_once(clients, server.address())  # the client's only place is free again
    stats = server.server.statistics().listeners[0]
    assert stats.client_refused == 0
    assert stats.closed_by_reason.get(CloseReason.HANDLER_ERROR.value) == 1


def test_unix_listener_ignores_tcp_options_and_says_so(
        serve: ServeFactory, clients: Clients, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    handler = ShapingHandler(tcp=False)
    path = str(tmp_path / "s.sock")
    with caplog.at_level(logging.WARNING, logger="portside"):
        serve(ListenerConfig(path=path, so_keepalive="on", tcp_user_timeout=3.0,
                             sndbuf=100_000), handler=handler)
        echo_once(clients, path)
    warnings = [record.getMessage() for record in caplog.records
                if "not a TCP socket" in record.getMessage()]
    assert warnings == [f"unix:{path} is not a TCP socket: so_keepalive, tcp_user_timeout "
                        "ignored there"]
    assert handler.seen[0]["sndbuf"] == 2 * 100_000  # socket-level options still apply


# -- a peer that vanishes without a FIN -----------------------------------------------------------

# Runs inside `unshare -n`: its own loopback, which it takes down once the connection is up, so
# nothing (no FIN, no RST, no ACK) passes any more. Prints how long after that the server's
# connection_closed came, and why.
VANISH = r"""
import json, socket, subprocess, sys, threading, time
from portside import Engine, Handler, ListenerConfig, Server, ServerConfig

engine, mode = sys.argv[1], sys.argv[2]
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
made, closed = threading.Event(), threading.Event()
state = {}

class Echo(Handler):
    def connection_made(self, conn, first_data):
        state["conn"] = conn
        made.set()
        super().connection_made(conn, first_data)

    def data_received(self, conn, data):
        conn.write(data)

    def connection_closed(self, conn, reason):
        state["closed"], state["reason"] = time.monotonic(), reason.value
        closed.set()

    def error(self, conn, exc):
        state["error"] = repr(exc)

settings = {"keepalive": {"so_keepalive": "1:1:2"}, "user-timeout": {"tcp_user_timeout": 1.0}}
server = Server(Echo(), [ListenerConfig(**settings[mode])], ServerConfig(engine=Engine(engine)))
server.start()
threading.Thread(target=server.run, kwargs={"install_signal_handlers": False},
                 daemon=True).start()
assert server.started.wait(10)
client = socket.create_connection(("127.0.0.1", server.listeners[0].port), timeout=10)
client.sendall(b"ping")
assert client.recv(4) == b"ping" and made.wait(10)
subprocess.run(["ip", "link", "set", "lo", "down"], check=True)
start = time.monotonic()
if mode == "user-timeout":  # unacknowledged data from now on
    sent = threading.Event()
    def write():
        state["conn"].write(b"x" * 1000)
        state["sent"] = time.monotonic()
        sent.set()
    server.call_soon_threadsafe(write)
    assert sent.wait(10)
    start = state["sent"]
ended = closed.wait(15)
print(json.dumps({"reason": state.get("reason"), "error": state.get("error"),
                  "seconds": state["closed"] - start if ended else None}), flush=True)
import os
os._exit(0)
"""


def vanish(engine: str, mode: str) -> dict[str, Any]:
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    require(unshare is not None and ip is not None, "unshare and ip (util-linux, iproute2)")
    assert unshare is not None
    probe = subprocess.run([unshare, "-n", "true"], capture_output=True)
    require(probe.returncode == 0, "permission to make a network namespace (unshare -n)")
    done = subprocess.run([unshare, "-n", sys.executable, "-c", VANISH, engine, mode],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("mode", ["keepalive", "user-timeout"])
def test_a_vanished_peer_is_found(engine: str, mode: str) -> None:
    """keepalive 1:1:2 gives up 1 s idle + 2 probes 1 s apart = 3 s after the last packet;
    tcp_user_timeout 1 s gives up 1 s after the first unacknowledged byte, at the next
    retransmission (RTO 200 ms, doubling). Neither may come early; both must come."""
    result = vanish(engine, mode)
    assert result["reason"] == CloseReason.PEER_TIMEOUT.value, result
    assert result["error"] is None  # asked for, so not an error
    seconds = result["seconds"]
    low, high = (2.9, 4.5) if mode == "keepalive" else (1.0, 2.6)
    assert low <= seconds <= high, result
