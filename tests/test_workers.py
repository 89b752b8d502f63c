"""Worker processes, the control command and signals, with real processes and real signals."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ENGINES, join
from proc import PortsideProcess, echo_once

WAIT = 20.0


def ctl(control: Path, command: str) -> Any:
    done = subprocess.run([sys.executable, "-m", "portside", "ctl", "--json", "--control",
                           str(control), command], capture_output=True, text=True,
                          timeout=WAIT, check=True)
    return json.loads(done.stdout)




@pytest.fixture
def control(tmp_path: Path) -> Path:
    return tmp_path / "ctl.sock"


@pytest.fixture
def supervised(control: Path, request: pytest.FixtureRequest) -> Iterator[PortsideProcess]:
    """``echo --workers 2``; its workers run the engine given by indirect parametrization
    (default: auto)."""
    engine = getattr(request, "param", "auto")
    proc = PortsideProcess(["echo", "--listen", "data-first@:0", "--listen", "immediate@:0",
                            "--defer-accept", "0", "--workers", "2", "--control", str(control),
                            "--drain-timeout", "30", "--engine", engine])
    try:
        yield proc
    finally:
        proc.kill()


def wait_workers(proc: PortsideProcess, count: int) -> list[int]:
    """The pids of the next ``count`` workers to report that they serve."""
    return [int(proc.wait_for(r"worker \d+ \(pid (\d+)\) is serving").group(1))
            for _ in range(count)]


@pytest.mark.parametrize("supervised", ENGINES, indirect=True)
def test_workers_share_every_listener_and_spread_connections(
        supervised: PortsideProcess, control: Path) -> None:
    """Every worker accepts on every listener. Which worker takes a connection is the kernel's
    choice (under load they spread: bench/results/spread-latest.md; a trickle may all go to
    the first idle one), so each worker in turn is stopped with SIGSTOP while connections
    arrive: the other must take them all, on both listeners."""
    ports = supervised.ports()
    workers = wait_workers(supervised, 2)
    socks: list[socket.socket] = []
    try:
        for stopped in workers:
            os.kill(stopped, signal.SIGSTOP)
            try:
                batch = [socket.create_connection(("127.0.0.1", ports[name]), timeout=WAIT)
                         for name in ("data-first", "immediate") * 3]
                socks.extend(batch)
                for sock in batch:
                    sock.sendall(b"x")
                for sock in batch:
                    assert sock.recv(1) == b"x"  # served while the other worker is stopped
            finally:
                os.kill(stopped, signal.SIGCONT)
        stats = ctl(control, "stats")
        assert {worker["pid"] for worker in stats["workers"]} == set(workers)
        assert [worker["connections"] for worker in stats["workers"]] == [6, 6], \
            f"connections did not spread: {stats['workers']}"
        assert stats["totals"]["active"] == len(socks)
        assert {listener["name"]: listener["accepted"] for listener in stats["listeners"]} == \
            {"data-first": 6, "immediate": 6}
    finally:
        for sock in socks:
            sock.close()
    assert ctl(control, "shutdown") == {"shutting_down": True}
    assert supervised.wait_exit() == 0
    assert not control.exists()


def test_killed_worker_is_replaced_while_the_other_serves(
        supervised: PortsideProcess, control: Path) -> None:
    ports = supervised.ports()
    first, second = wait_workers(supervised, 2)
    os.kill(first, signal.SIGKILL)
    supervised.wait_for(rf"\(pid {first}\) died .*killed by SIGKILL")
    replacement = wait_workers(supervised, 1)[0]
    for _ in range(20):
        assert echo_once(ports["immediate"]) == b"ping"
    stats = ctl(control, "stats")
    assert {worker["pid"] for worker in stats["workers"]} == {second, replacement}
    assert stats["restarts"] == 1


def test_pause_resume_and_stats_through_ctl(supervised: PortsideProcess, control: Path) -> None:
    ports = supervised.ports()
    wait_workers(supervised, 2)
    live = socket.create_connection(("127.0.0.1", ports["immediate"]), timeout=WAIT)
    live.sendall(b"a")
    assert live.recv(1) == b"a"
    assert ctl(control, "pause")["accepting_paused"] is True
    waiting = socket.create_connection(("127.0.0.1", ports["immediate"]), timeout=0.5)
    waiting.sendall(b"queued")
    with pytest.raises(TimeoutError):  # in the backlog: nobody accepts it while paused
        waiting.recv(6)
    live.sendall(b"b")  # live connections go on being served
    assert live.recv(1) == b"b"
    assert ctl(control, "stats")["accepting_paused"] is True
    assert ctl(control, "resume")["accepting_paused"] is False
    waiting.settimeout(WAIT)
    assert waiting.recv(6) == b"queued"
    stats = ctl(control, "stats")
    assert stats["totals"]["accepted"] == 2 and stats["totals"]["active"] == 2
    live.close()
    waiting.close()


def test_sigterm_drains_clients_then_exits_zero(supervised: PortsideProcess) -> None:
    ports = supervised.ports()
    wait_workers(supervised, 2)
    sock = socket.create_connection(("127.0.0.1", ports["immediate"]), timeout=WAIT)
    sock.sendall(b"before")
    assert sock.recv(6) == b"before"
    supervised.signal(signal.SIGTERM)
    supervised.wait_for(r"SIGTERM: shutting down gracefully")
    supervised.wait_for(r"draining 1 connection")
    sock.sendall(b"during")  # the conversation goes on while the server drains
    sock.shutdown(socket.SHUT_WR)
    received = b""
    while data := sock.recv(4096):
        received += data
    assert received == b"during"  # every byte, then a clean EOF
    sock.close()
    assert supervised.wait_exit() == 0


@pytest.mark.parametrize("supervised", ENGINES, indirect=True)
def test_sigterm_refuses_newcomers_at_once_while_a_conversation_finishes(
        supervised: PortsideProcess) -> None:
    """Every copy of the listening sockets (each worker's, the supervisor's) closes as draining
    starts, as in a single process: a newcomer is refused, not left in a backlog nobody
    accepts from (to hang, then be reset)."""
    ports = supervised.ports()
    wait_workers(supervised, 2)
    sock = socket.create_connection(("127.0.0.1", ports["immediate"]), timeout=WAIT)
    sock.sendall(b"before")
    assert sock.recv(6) == b"before"
    supervised.signal(signal.SIGTERM)
    supervised.wait_for(r"draining 1 connection")  # the busy worker
    # The idle one, whose exit may come before or after the busy one says it drains.
    supervised.wait_for(r"worker \d \(pid \d+\) stopped \(exit status 0\)", seen_too=True)
    for port in ports.values():
        started = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5.0).close()
        assert time.monotonic() - started < 1.0
    sock.sendall(b"during")  # the conversation accepted before goes on to its end
    sock.shutdown(socket.SHUT_WR)
    received = b""
    while data := sock.recv(4096):
        received += data
    assert received == b"during"
    sock.close()
    assert supervised.wait_exit() == 0


@pytest.mark.parametrize("supervised", ENGINES, indirect=True)
def test_sighup_restarts_workers_without_breaking_a_live_echo(
        supervised: PortsideProcess, control: Path) -> None:
    ports = supervised.ports()
    old = set(wait_workers(supervised, 2))
    sock = socket.create_connection(("127.0.0.1", ports["immediate"]), timeout=WAIT)
    errors: list[BaseException] = []
    stop = threading.Event()
    rounds = [0]

    def chat() -> None:
        try:
            while not stop.is_set() and rounds[0] < 100_000:
                message = f"round {rounds[0]};".encode()
                sock.sendall(message)
                got = b""
                while len(got) < len(message):
                    data = sock.recv(len(message) - len(got))
                    if not data:
                        raise ConnectionError("EOF mid-echo")
                    got += data
                assert got == message
                rounds[0] += 1
        except BaseException as exc:
            errors.append(exc)

    talker = threading.Thread(target=chat)
    talker.start()
    supervised.signal(signal.SIGHUP)
    new = set(wait_workers(supervised, 2))
    assert not new & old
    # New connections are served by the new workers while the old one still drains ours.
    for _ in range(10):
        assert echo_once(ports["immediate"]) == b"ping"
    stop.set()
    join(talker)
    assert not errors, errors
    assert rounds[0] > 0
    sock.shutdown(socket.SHUT_WR)
    assert sock.recv(10) == b""
    sock.close()
    for pid in old:  # both retired gracefully: the idle one at once, ours once we left
        supervised.wait_for(rf"\(pid {pid}\) stopped \(exit status 0\)", seen_too=True)
    stats = ctl(control, "stats")
    assert {worker["pid"] for worker in stats["workers"]} == new


def test_ctl_without_a_server_says_so(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "portside", "ctl", "--control",
                           str(tmp_path / "nobody.sock"), "stats"],
                          capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0
    assert "no portside server is listening" in done.stderr
    assert "Traceback" not in done.stderr


def test_single_process_control_and_bad_requests(control: Path) -> None:
    proc = PortsideProcess(["echo", "--listen", "data-first@:0", "--listen", "immediate@:0",
                            "--control", str(control)])
    try:
        ports = proc.ports()
        assert oct(control.stat().st_mode & 0o777) == "0o600"
        assert echo_once(ports["immediate"]) == b"ping"
        with socket.socket(socket.AF_UNIX) as raw:
            raw.settimeout(WAIT)
            raw.connect(str(control))
            for bad in (b"{nope\n", b'{"v":1,"command":"explode"}\n', b'{"v":9}\n', b"[1]\n",
                        b"x" * 70_000 + b"\n"):
                raw.sendall(bad)
                reply = json.loads(raw.makefile().readline())
                assert reply["ok"] is False and reply["error"]
        stats = ctl(control, "stats")
        assert stats["totals"]["accepted"] == 1 and len(stats["workers"]) == 1
        assert ctl(control, "shutdown")["shutting_down"] is True
        assert proc.wait_exit() == 0
    finally:
        proc.kill()


def _serve(handler: str, control: Path, *extra: str) -> PortsideProcess:
    tests_dir = str(Path(__file__).parent)
    return PortsideProcess(["serve", f"handlers:{handler}", "--listen", "immediate@127.0.0.1:0",
                            "--control", str(control), *extra],
                           env={"PYTHONPATH": os.pathsep.join(
                               filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))})


def test_stuck_worker_is_replaced(control: Path) -> None:
    proc = _serve("StuckHandler", control, "--workers", "1", "--heartbeat-timeout", "1")
    try:
        port = int(proc.wait_for(r"listening on [\d.]+:(\d+)").group(1))
        stuck = wait_workers(proc, 1)[0]
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
            sock.sendall(b"hang")
            proc.wait_for(rf"\(pid {stuck}\) has not answered")
            proc.wait_for(rf"\(pid {stuck}\) died .*SIGKILL")
        wait_workers(proc, 1)
        assert echo_once(port) == b"ping"
        proc.signal(signal.SIGTERM)
        assert proc.wait_exit() == 0
    finally:
        proc.kill()


def test_crashing_worker_is_restarted_with_back_off(control: Path) -> None:
    proc = _serve("CrashingHandler", control, "--workers", "1")
    try:
        deaths = []
        for _ in range(4):
            deaths.append(proc.wait_for(
                r"^(\S+ \S+) \[\d+ supervisor\] WARNING .*worker \d+ \(pid \d+\) died .*"
                r"exit status 3"))
        stamps = [_seconds_of(match.group(1)) for match in deaths]
        gaps = [later - earlier for earlier, later in itertools.pairwise(stamps)]
        # Back-off doubles from 0.1 s: a tight fork loop would show gaps of a few milliseconds.
        assert gaps[-1] >= 0.15, gaps
        assert gaps[-1] > gaps[0], gaps
        proc.signal(signal.SIGTERM)
        assert proc.wait_exit() == 0
    finally:
        proc.kill()


def _seconds_of(stamp: str) -> float:
    clock = stamp.split()[1]
    hours, minutes, rest = clock.split(":")
    seconds, millis = rest.split(",")
    return int(hours) * 3600 + int(minutes) * 60 + int(seconds) + int(millis) / 1000


@pytest.mark.parametrize("handler", ["NeverBoots", "missing_module:Handler"])
def test_worker_that_fails_to_boot_stops_the_supervisor(control: Path, handler: str) -> None:
    """Like gunicorn's "Worker failed to boot": a clear message and a non-zero status, not a
    respawn loop; and no worker left behind."""
    proc = _serve(handler, control, "--workers", "2")
    try:
        assert proc.wait_exit() == 3
        text = proc.text()
        assert "worker failed to boot 3 times in a row" in text, text
        assert "Traceback" not in text, text
        for pid in re.findall(r"started worker \d+ \(pid (\d+)\)", text):
            with pytest.raises(ProcessLookupError):
                os.kill(int(pid), 0)
        assert not control.exists()
    finally:
        proc.kill()


def test_log_lines_name_their_process(supervised: PortsideProcess) -> None:
    supervised.ports()
    pids = wait_workers(supervised, 2)
    supervisor = supervised.proc.pid
    supervised.wait_for(rf"\[{supervisor} supervisor\] INFO portside\.supervisor: serving ",
                        seen_too=True)
    for pid in pids:
        supervised.wait_for(rf"\[{pid} worker [12]\] INFO portside: listening on",
                            seen_too=True)
    supervised.signal(signal.SIGTERM)
    assert supervised.wait_exit() == 0
    for line in supervised.lines:
        assert re.match(r"\S+ \S+ \[\d+( supervisor| worker \d+)\] ", line), line
    assert re.search(r"stopped after [\d.]+ s", supervised.lines[-1]), supervised.lines[-1]
