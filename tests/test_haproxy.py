"""Behind a real HAProxy: two portside instances, PROXY protocol v2, traffic through the
balancer, and a graceful restart of one instance while HAProxy keeps serving.

HAProxy reaches the instances over Unix sockets, whose peers portside always trusts to send a
PROXY header (the command line has no flag for ``trusted_proxies`` yet). Over TCP with nothing
trusted, the default, every connection HAProxy makes is refused: tested too."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import join, require_tool, start_helper
from proc import PortsideProcess

WAIT = 20.0
# tests/ for the handlers module, ahead of (not instead of) any path already set.
HANDLERS_ON_PATH = {"PYTHONPATH": os.pathsep.join(
    part for part in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if part)}


def _haproxy() -> str:
    return require_tool("haproxy")


def start_instance(tmp_path: Path, name: str) -> tuple[PortsideProcess, str]:
    """An instance on a Unix socket; returns it and its address as HAProxy's config names it."""
    path = tmp_path / f"{name}.sock"
    proc = PortsideProcess(
        ["serve", "handlers:PeerEcho", "--listen", f"immediate@unix:{path}", "--proxy-protocol",
         "v2", "--workers", "2", "--control", str(tmp_path / f"{name}.ctl"),
         "--drain-timeout", "10"],
        env=HANDLERS_ON_PATH)
    proc.wait_for(r"listening on unix:")
    for _ in range(2):
        proc.wait_for(r"started worker")
    return proc, str(path)


def haproxy_in_front(tmp_path: Path, servers: list[str], send_proxy: str = "send-proxy-v2",
                     ) -> tuple[socket.socket, subprocess.Popen[bytes]]:
    """HAProxy in TCP mode, round robin over ``servers`` with PROXY v2 (or ``send_proxy``,
    HAProxy's keyword); it serves a socket we bound, so it is listening before HAProxy even
    starts."""
    front = socket.socket()
    front.bind(("127.0.0.1", 0))
    front.listen(128)
    config = tmp_path / "haproxy.cfg"
    lines = "\n".join(f"    server s{i} {address} {send_proxy}"
                      for i, address in enumerate(servers))
    config.write_text(f"""
global
    maxconn 2000
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    retries 3
    option redispatch
frontend front
    bind fd@{front.fileno()}
    default_backend portside
backend portside
    balance roundrobin
{lines}
""")
    proxy = subprocess.Popen([_haproxy(), "-f", str(config), "-db"], pass_fds=[front.fileno()],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return front, proxy


@pytest.fixture
def balanced(tmp_path: Path) -> Iterator[tuple[int, list[PortsideProcess]]]:
    _haproxy()
    instances = [start_instance(tmp_path, name) for name in ("one", "two")]
    front, proxy = haproxy_in_front(tmp_path, [path for _, path in instances])
    try:
        yield front.getsockname()[1], [proc for proc, _ in instances]
    finally:
        proxy.terminate()
        proxy.wait(WAIT)
        front.close()
        for proc, _ in instances:
            proc.kill()


def talk(port: int, source: str, payload: bytes) -> tuple[str, bytes]:
    """One conversation through HAProxy from ``source``; returns who the server saw, and the
    echo."""
    with socket.socket() as sock:
        sock.settimeout(WAIT)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while data := sock.recv(65536):
            received += data
    greeting, _, echoed = received.partition(b"\n")
    return greeting.decode(), echoed


def test_client_address_and_bytes_survive_the_balancer(
        balanced: tuple[int, list[PortsideProcess]]) -> None:
    port, _ = balanced
    pids = set()
    for i in range(20):
        source = f"127.0.0.{2 + i % 5}"
        payload = os.urandom(1000 + 997 * i)
        greeting, echoed = talk(port, source, payload)
        words = greeting.split()
        assert words[:2] == ["peer", source], greeting  # the real client, not HAProxy
        assert echoed == payload
        pids.add(words[-1])
    assert len(pids) >= 2  # round robin over both instances (and their workers)


def test_graceful_restart_behind_haproxy(
        balanced: tuple[int, list[PortsideProcess]]) -> None:
    """One instance restarts its workers (SIGHUP) under traffic through HAProxy: no
    conversation fails, and the restarted instance's new workers serve conversations (each
    greeting names the pid that served it)."""
    port, instances = balanced
    done = threading.Event()
    progress = threading.Condition()
    served_by: list[str] = []

    def traffic() -> None:
        while not done.is_set() and len(served_by) < 5000:
            payload = os.urandom(2000)
            greeting, echoed = talk(port, "127.0.0.9", payload)
            assert echoed == payload
            with progress:
                served_by.append(greeting.split()[-1])
                progress.notify_all()

    clients = [start_helper(traffic, name=f"haproxy-client-{n}") for n in range(4)]
    restarting = instances[0]
    restarting.signal(signal.SIGHUP)
    new_pids = {restarting.wait_for(r"started worker \d+ \(pid (\d+)\)").group(1)
                for _ in range(2)}
    for _ in range(2):
        restarting.wait_for(r"worker \d+ \(pid \d+\) stopped \(exit status 0\)")

    def new_workers_served() -> bool:
        return len(new_pids & set(served_by)) == 2 or not all(c.is_alive() for c in clients)

    try:
        with progress:  # keep going until both new workers have served traffic
            progress.wait_for(new_workers_served, WAIT)
    finally:
        done.set()
        for client in clients:
            join(client)
    assert new_pids <= set(served_by), (new_pids, set(served_by))


def test_untrusted_balancer_is_refused(tmp_path: Path) -> None:
    """A TCP listener that expects PROXY headers trusts no source by default: HAProxy's
    connections are reset at accept, the client gets nothing, and the log says why."""
    _haproxy()
    proc = PortsideProcess(
        ["serve", "handlers:PeerEcho", "--listen", "immediate@127.0.0.1:0",
         "--proxy-protocol", "v2", "--control", str(tmp_path / "tcp.ctl")],
        env=HANDLERS_ON_PATH)
    front: socket.socket | None = None
    proxy: subprocess.Popen[bytes] | None = None
    try:
        port = int(proc.wait_for(r"listening on [\d.]+:(\d+)").group(1))
        proc.wait_for(r"trusted_proxies is empty: every TCP connection will be refused",
                      seen_too=True)
        front, proxy = haproxy_in_front(tmp_path, [f"127.0.0.1:{port}"])
        with contextlib.suppress(ConnectionResetError):
            _, echoed = talk(front.getsockname()[1], "127.0.0.1", b"hello")
            assert echoed == b""
        proc.wait_for(r"refused 127\.0\.0\.1:\d+ on 127\.0\.0\.1:\d+: not in trusted_proxies")
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(WAIT)
        if front is not None:
            front.close()
        proc.kill()


@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
def test_server_speaks_first_behind_haproxy(tmp_path: Path, engine: str,
                                            send_proxy: str) -> None:
    """Issue 17, defect 1: a greeting protocol (SMTP, POP3, FTP, MySQL) behind HAProxy's
    send-proxy. The client says nothing and waits for the banner; the listener is immediate,
    so the handler's connection_made runs once HAProxy's header is in, not when the client
    speaks (it hung, then was reset at the first-data deadline)."""
    _haproxy()
    proc = PortsideProcess(
        ["serve", "handlers:PeerEcho", "--listen", "immediate@127.0.0.1:0", "--engine", engine,
         "--proxy-protocol", "any", "--trusted-proxies", "127.0.0.1/32",
         "--first-data-timeout", "5", "--control", str(tmp_path / "greet.ctl")],
        env=HANDLERS_ON_PATH)
    front: socket.socket | None = None
    proxy: subprocess.Popen[bytes] | None = None
    try:
        port = int(proc.wait_for(r"listening on [\d.]+:(\d+)").group(1))
        front, proxy = haproxy_in_front(tmp_path, [f"127.0.0.1:{port}"], send_proxy)
        with socket.socket() as sock:
            sock.settimeout(2.5)  # half the first-data deadline: the banner comes at once
            sock.bind(("127.0.0.5", 0))
            sock.connect(front.getsockname())
            banner = b""
            while not banner.endswith(b"\n"):
                data = sock.recv(100)
                assert data, f"closed before the banner; got {banner!r}"
                banner += data
            assert banner.split()[:2] == [b"peer", b"127.0.0.5"]  # the client, not HAProxy
            sock.sendall(b"and then the client speaks")
            assert sock.recv(100) == b"and then the client speaks"
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(WAIT)
        if front is not None:
            front.close()
        proc.kill()
