"""Per-client admission on every engine, with real sockets on loopback: the open-connection
and rate limits per client address (other 127.0.0.x sources unaffected), IPv6 on ::1 and
grouping by prefix, the client a PROXY header names, the reset a refused client sees, the
table's bound, and the statistics."""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    Clients,
    RecordingHandler,
    RunningServer,
    ServeFactory,
    assert_on_time,
    recv_exactly,
    require_ipv6,
    seconds_until_closed,
)
from proc import PortsideProcess
from prometheus_client.parser import text_string_to_metric_families

from portside import (
    AcceptPolicy,
    CloseReason,
    Connection,
    Engine,
    ListenerConfig,
    Server,
    ServerConfig,
)
from portside.protocols.proxy import encode_v1, encode_v2

BALANCED = ("198.51.100.1", 443)
BALANCED6 = ("2001:db8::443", 443)
TRUST = ("127.0.0.1/32",)


def connect_from(clients: Clients, source: str, address: tuple[str, int]) -> socket.socket:
    """A client socket bound to ``source`` (any 127.0.0.0/8 address is this machine's)."""
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    clients.sockets.append(sock)
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(address)
    return sock


def echoes(sock: socket.socket, data: bytes = b"ping") -> bool:
    sock.sendall(data)
    return recv_exactly(sock, len(data)) == data


def assert_reset(connect: Callable[[], socket.socket], data: bytes = b"hello") -> None:
    """The server reset the connection (RST, not FIN) without answering. On loopback the
    reset can beat connect() back to user space, or reach sendall() first, or recv()."""
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        sock = connect()
        sock.sendall(data)
        answer = sock.recv(100)
        raise AssertionError(f"expected a reset, got {answer!r} (b'' is a FIN)")


def closed_on_server(rs: RunningServer, count: int) -> None:
    rs.handler.wait(lambda: rs.handler.closed_count() >= count, f"{count} connections closed")


def test_open_connections_per_address(serve: ServeFactory, clients: Clients,
                                      caplog: pytest.LogCaptureFixture) -> None:
    rs = serve(ListenerConfig(max_connections_per_client=2))
    address = rs.address()
    first = [connect_from(clients, "127.0.0.2", address) for _ in range(2)]
    assert all(echoes(sock) for sock in first)
    assert_reset(lambda: connect_from(clients, "127.0.0.2", address))
    # Another address is a client of its own.
    others = [connect_from(clients, "127.0.0.3", address) for _ in range(2)]
    assert all(echoes(sock) for sock in others)
    # One of the first client's connections ends: it may open one again, not two.
    first[0].close()
    closed_on_server(rs, 1)
    again = connect_from(clients, "127.0.0.2", address)
    assert echoes(again)
    assert_reset(lambda: connect_from(clients, "127.0.0.2", address))
    stats = rs.server.statistics().listeners[0]
    assert stats.client_refused == 2
    assert stats.closed_by_reason == {"closed": 1, "client-limit": 2}
    assert stats.accepted == 7 and stats.active == 4
    assert stats.clients_tracked == 2
    assert len(rs.handler.made) == 5  # the handler never heard of the refused ones
    lines = [r.getMessage() for r in caplog.records if "per-client" in r.getMessage()
             or "over max_connections_per_client" in r.getMessage()]
    assert sum("refused 127.0.0.2:" in line for line in lines) == 2
    # Every connection gone, every count back to zero.
    clients.close_all()
    closed_on_server(rs, 5)
    assert rs.server.statistics().listeners[0].clients_tracked == 0


def test_connection_rate_per_address(serve: ServeFactory, clients: Clients) -> None:
    """Three per minute: the fourth within the minute is reset, whether the first three are
    still open or not; another address is not affected. (When the window lets a client in
    again is tested with a hand-held clock in test_admission_policy.)"""
    rs = serve(ListenerConfig(max_connection_rate_per_client=3, client_rate_period=60))
    address = rs.address()
    for _ in range(3):
        sock = connect_from(clients, "127.0.0.4", address)
        assert echoes(sock)
        sock.close()
    assert_reset(lambda: connect_from(clients, "127.0.0.4", address))
    for _ in range(3):
        assert echoes(connect_from(clients, "127.0.0.5", address))
    assert_reset(lambda: connect_from(clients, "127.0.0.5", address))
    stats = rs.server.statistics().listeners[0]
    assert stats.client_refused == 2 and stats.closed_by_reason["client-limit"] == 2
    assert stats.clients_tracked == 2  # remembered while their window lasts


def test_ipv6_on_loopback(serve: ServeFactory, clients: Clients) -> None:
    require_ipv6()
    rs = serve(ListenerConfig(host="::1", max_connections_per_client=1))
    address = rs.address()
    held = connect_from(clients, "::1", address)
    assert echoes(held)
    assert_reset(lambda: connect_from(clients, "::1", address))
    held.close()
    closed_on_server(rs, 1)
    assert echoes(connect_from(clients, "::1", address))
    assert rs.server.statistics().listeners[0].client_refused == 1


def proxied(clients: Clients, rs: RunningServer, client: tuple[str, int]) -> socket.socket:
    """A connection from the trusted balancer (127.0.0.1) on behalf of ``client``."""
    sock = connect_from(clients, "127.0.0.1", rs.address())
    sock.sendall(encode_v1(client, BALANCED6 if ":" in client[0] else BALANCED))
    return sock


def test_behind_a_proxy_the_header_names_the_client(serve: ServeFactory,
                                                    clients: Clients) -> None:
    """Every connection comes from the balancer's one address; the limit counts the clients
    its headers name, checked once the header is parsed."""
    rs = serve(ListenerConfig(proxy_protocol="any", trusted_proxies=TRUST,  # type: ignore[arg-type]
                              max_connections_per_client=1))
    held = proxied(clients, rs, ("203.0.113.7", 40001))
    assert echoes(held)
    assert_reset(lambda: proxied(clients, rs, ("203.0.113.7", 40002)))
    assert echoes(proxied(clients, rs, ("203.0.113.8", 40003)))
    # A LOCAL header (the balancer's health check) names no client: never limited.
    for _ in range(2):
        check = connect_from(clients, "127.0.0.1", rs.address())
        check.sendall(encode_v2(None, None))
        assert echoes(check)
    held.close()
    closed_on_server(rs, 2)  # the refused one, then the one closed here
    assert echoes(proxied(clients, rs, ("203.0.113.7", 40004)))
    stats = rs.server.statistics().listeners[0]
    assert stats.client_refused == 1 and stats.proxy_refused == 0
    assert stats.closed_by_reason == {"client-limit": 1, "closed": 1}
    assert stats.clients_tracked == 2
    refused = [reasons for reasons in rs.handler.closed.values()
               if reasons == [CloseReason.CLIENT_LIMIT]]
    assert len(refused) == 1  # told as any pending connection's end, never made
    clients.close_all()
    closed_on_server(rs, 6)
    assert rs.server.statistics().listeners[0].clients_tracked == 0


def test_ipv6_clients_are_grouped_by_prefix(serve: ServeFactory, clients: Clients) -> None:
    """Behind a balancer, IPv6 clients in one /64 (the default) count as one client."""
    rs = serve(ListenerConfig(proxy_protocol="v1", trusted_proxies=TRUST,  # type: ignore[arg-type]
                              max_connections_per_client=1),
               ListenerConfig(proxy_protocol="v1", trusted_proxies=TRUST,  # type: ignore[arg-type]
                              max_connections_per_client=1, client_ipv6_prefix=128))
    assert echoes(proxied(clients, rs, ("2001:db8:1:2::1", 40001)))
    assert_reset(lambda: proxied(clients, rs, ("2001:db8:1:2:ffff::9", 40002)))
    assert echoes(proxied(clients, rs, ("2001:db8:1:3::1", 40003)))
    # A /128 listener tells the two addresses apart.
    sock = connect_from(clients, "127.0.0.1", rs.address(1))
    sock.sendall(encode_v1(("2001:db8:1:2::1", 40004), BALANCED6))
    assert echoes(sock)
    sock = connect_from(clients, "127.0.0.1", rs.address(1))
    sock.sendall(encode_v1(("2001:db8:1:2:ffff::9", 40005), BALANCED6))
    assert echoes(sock)
    stats = rs.server.statistics().listeners
    assert (stats[0].client_refused, stats[1].client_refused) == (1, 0)


def test_table_bound_under_many_addresses(serve: ServeFactory, clients: Clients,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """40 distinct addresses, a table of 8: those with a window to remember make way for new
    ones, and once 8 hold connections newcomers are let in untracked (failing open)."""
    caplog.set_level(logging.INFO, "portside")
    rs = serve(ListenerConfig(max_connection_rate_per_client=5, client_rate_period=60,
                              client_table_size=8))
    address = rs.address()
    for number in range(40):
        sock = connect_from(clients, f"127.0.1.{number + 1}", address)
        assert echoes(sock)
        sock.close()
        stats = rs.server.statistics().listeners[0]
        assert stats.clients_tracked <= 8
    held = [connect_from(clients, f"127.0.2.{number + 1}", address) for number in range(12)]
    assert all(echoes(sock) for sock in held)
    stats = rs.server.statistics().listeners[0]
    assert stats.clients_tracked == 8 and stats.client_refused == 0
    assert any("client_table_size" in r.getMessage() for r in caplog.records)


def test_every_ending_gives_the_place_back(serve: ServeFactory, clients: Clients) -> None:
    """One connection per client: after each way a connection can end (the client's FIN, its
    reset, the first-data deadline, behind a balancer too) the client may connect again, and
    nothing stays counted."""
    rs = serve(ListenerConfig(policy=AcceptPolicy.DATA_FIRST, defer_accept=0,
                              first_data_timeout=0.8, max_connections_per_client=1),
               ListenerConfig(proxy_protocol="v1", trusted_proxies=TRUST,  # type: ignore[arg-type]
                              max_connections_per_client=1))
    address = rs.address()
    endings = 0

    def ended() -> None:
        nonlocal endings
        endings += 1
        closed_on_server(rs, endings)

    sock = connect_from(clients, "127.0.0.6", address)
    assert echoes(sock)
    sock.close()  # FIN
    ended()
    sock = connect_from(clients, "127.0.0.6", address)
    assert echoes(sock)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST
    ended()
    connected = time.monotonic()
    silent = connect_from(clients, "127.0.0.6", address)  # says nothing: the deadline ends it
    assert_on_time(seconds_until_closed(silent, connected), 0.8)
    ended()
    assert list(rs.handler.closed.values())[-1] == [CloseReason.FIRST_DATA_TIMEOUT]
    silent.close()
    assert echoes(connect_from(clients, "127.0.0.6", address))
    # Behind the balancer: a client whose header came whole, then its end by the handler's
    # side (a write after our FIN would be refused: here the client half-closes).
    sock = connect_from(clients, "127.0.0.1", rs.address(1))
    sock.sendall(encode_v1(("203.0.113.9", 1), BALANCED) + b"ping")
    assert recv_exactly(sock, 4) == b"ping"
    sock.shutdown(socket.SHUT_WR)
    assert sock.recv(10) == b""
    ended()
    sock = connect_from(clients, "127.0.0.1", rs.address(1))
    sock.sendall(encode_v1(("203.0.113.9", 2), BALANCED) + b"ping")
    assert recv_exactly(sock, 4) == b"ping"
    clients.close_all()
    closed_on_server(rs, endings + 2)
    stats = rs.server.statistics().listeners
    assert [item.clients_tracked for item in stats] == [0, 0]
    assert [item.client_refused for item in stats] == [0, 0]


class ClosingHandler(RecordingHandler):
    """Closes every connection inside connection_made: its end comes before accept returns."""

    def connection_made(self, conn: Connection, first_data: memoryview | None) -> None:
        super().connection_made(conn, first_data)
        conn.close()


def test_a_close_inside_connection_made(serve: ServeFactory, clients: Clients) -> None:
    rs = serve(ListenerConfig(max_connections_per_client=1), handler=ClosingHandler())
    for number in range(3):
        sock = connect_from(clients, "127.0.0.7", rs.address())
        assert sock.recv(10) == b""  # a FIN each time: never refused
        sock.close()  # our FIN ends the server's linger
        closed_on_server(rs, number + 1)
    stats = rs.server.statistics().listeners[0]
    assert stats.client_refused == 0 and stats.clients_tracked == 0


def test_statistics_in_ctl_stats_metrics_and_top(tmp_path: Path) -> None:
    """The two figures reach every place statistics go: ``ctl stats``, Prometheus and top."""
    control = tmp_path / "ctl"
    proc = PortsideProcess(["echo", "--data-first-port", "0", "--immediate-port", "0",
                            "--max-connections-per-client", "1", "--metrics", "127.0.0.1:0",
                            "--control", str(control)])
    try:
        port = proc.ports()["immediate"]
        metrics_port = int(proc.wait_for(r"metrics on http://127.0.0.1:(\d+)/metrics",
                                         seen_too=True).group(1))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as held:
            assert echoes(held)
            assert_reset(lambda: socket.create_connection(("127.0.0.1", port), timeout=10))

            def run(*args: str) -> str:
                done = subprocess.run([sys.executable, "-m", "portside", *args,
                                       "--control", str(control)], capture_output=True,
                                      text=True, timeout=20, check=True,
                                      env={**os.environ, "COLUMNS": "250"})
                return done.stdout

            document = json.loads(run("ctl", "--json", "stats"))
            (entry,) = [item for item in document["listeners"] if item["name"] == "immediate"]
            assert entry["client_refused"] == 1 and entry["clients_tracked"] == 1
            assert entry["closed_by_reason"] == {"client-limit": 1}
            top = run("top", "--once")
            assert "client rej/s" in top and "clients" in top
            top_json = json.loads(run("top", "--once", "--json"))
            assert any(item["clients_tracked"] == 1
                       for item in top_json["stats"]["listeners"])
            body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                          timeout=20).read().decode()
        found = {(sample.name, sample.labels.get("listener")): sample.value
                 for family in text_string_to_metric_families(body)
                 for sample in family.samples}
        assert found[("portside_client_refused_total", "immediate")] == 1
        assert found[("portside_clients_tracked", "immediate")] == 1
        assert found[("portside_client_refused_total", "data-first")] == 0
    finally:
        proc.kill()


def test_an_inherited_unix_socket_says_the_limits_do_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A Unix socket handed over as fd://N cannot be told from TCP when the settings are
    checked: the listener says at start that its clients have no address to count."""
    path = str(tmp_path / "inherited.sock")
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(path)
    listening.listen()
    config = ListenerConfig(fd=listening.fileno(), max_connections_per_client=1)
    server = Server(RecordingHandler(), [config], ServerConfig(engine=Engine.EPOLL),
                    sockets=[listening])
    server.start()
    try:
        assert any("per-client limits do nothing" in r.getMessage() for r in caplog.records)
    finally:
        server.shutdown(0)
        listening.close()
