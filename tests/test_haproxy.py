"""Behind a real HAProxy: two portside instances, PROXY protocol v2, traffic through the
balancer, and a graceful restart of one instance while HAProxy keeps serving."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from proc import PortsideProcess

WAIT = 20.0


def _haproxy() -> str:
    path = shutil.which("haproxy")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("haproxy is missing: scripts/test installs Debian's haproxy")
        pytest.skip("haproxy not installed (scripts/test installs it)")
    return path


def start_instance(tmp_path: Path, name: str) -> tuple[PortsideProcess, int]:
    proc = PortsideProcess(
        ["serve", "handlers:PeerEcho", "--listen", "immediate@127.0.0.1:0", "--proxy-protocol",
         "v2", "--workers", "2", "--control", str(tmp_path / f"{name}.ctl"),
         "--drain-timeout", "10"],
        env={"PYTHONPATH": str(Path(__file__).parent)})
    port = int(proc.wait_for(r"listening on [\d.]+:(\d+)").group(1))
    for _ in range(2):
        proc.wait_for(r"started worker")
    return proc, port


@pytest.fixture
def balanced(tmp_path: Path) -> Iterator[tuple[int, list[PortsideProcess]]]:
    haproxy = _haproxy()
    instances = [start_instance(tmp_path, name) for name in ("one", "two")]
    # HAProxy serves a socket we bound, so it is listening before HAProxy even starts.
    front = socket.socket()
    front.bind(("127.0.0.1", 0))
    front.listen(128)
    config = tmp_path / "haproxy.cfg"
    servers = "\n".join(f"    server s{i} 127.0.0.1:{port} send-proxy-v2"
                        for i, (_, port) in enumerate(instances))
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
{servers}
""")
    proxy = subprocess.Popen([haproxy, "-f", str(config), "-db"], pass_fds=[front.fileno()],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
    port, instances = balanced
    errors: list[BaseException] = []
    done = threading.Event()
    progress = threading.Condition()
    conversations = [0]

    def traffic() -> None:
        try:
            while not done.is_set() and conversations[0] < 5000:
                payload = os.urandom(2000)
                _, echoed = talk(port, "127.0.0.9", payload)
                assert echoed == payload
                with progress:
                    conversations[0] += 1
                    progress.notify_all()
        except BaseException as exc:
            errors.append(exc)
        with progress:
            progress.notify_all()

    clients = [threading.Thread(target=traffic) for _ in range(4)]
    for client in clients:
        client.start()
    restarting = instances[0]
    restarting.signal(signal.SIGHUP)
    for _ in range(2):
        restarting.wait_for(r"started worker")
    for _ in range(2):
        restarting.wait_for(r"worker \d+ stopped \(exit status 0\)")
    before = conversations[0]
    with progress:  # keep going until the new workers have served traffic too
        progress.wait_for(lambda: conversations[0] >= before + 40 or bool(errors), WAIT)
    done.set()
    for client in clients:
        client.join(WAIT)
    assert not errors, errors[:3]
    assert conversations[0] >= before + 40
