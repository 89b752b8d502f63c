"""Reloads (SIGHUP: new code, re-read settings), upgrades (USR2: a new supervisor on the same
sockets) and systemd's notify protocol, with real processes, signals and sockets, and a
connection stream running across each change that must see no error."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ALL_ENGINES, join, require_engine
from proc import WAIT, PortsideProcess, echo_once

SRC = str(Path(__file__).resolve().parent.parent / "src")

HANDLER = """
from portside.examples.echo import EchoHandler

class Tagged(EchoHandler):
    def data_received(self, conn, data):
        conn.write({tag!r} + bytes(data))
"""


class Stream:
    """New connections, one after another, and one long conversation, from two threads until
    stopped (or a minute, or a million rounds): every reply is checked, every error kept."""

    LIMIT = 1_000_000
    DEADLINE = 60.0

    def __init__(self, port: int, tags: tuple[bytes, ...]) -> None:
        self.port = port
        self.tags = tags
        self.errors: list[BaseException] = []
        self.replies: list[bytes] = []
        self.rounds = 0
        self.stop = threading.Event()
        self._progress = threading.Condition()
        self.long = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.threads = [threading.Thread(target=self._connections),
                        threading.Thread(target=self._conversation)]
        for thread in self.threads:
            thread.start()

    def _running(self, count: int, started: float) -> bool:
        return not self.stop.is_set() and count < self.LIMIT and \
            time.monotonic() - started < self.DEADLINE

    def _connections(self) -> None:
        try:
            started = time.monotonic()
            while self._running(len(self.replies), started):
                reply = echo_once(self.port, b"hello")
                assert reply.endswith(b"hello") and reply[:-5] in self.tags, reply
                with self._progress:
                    self.replies.append(reply[:-5])
                    self._progress.notify_all()
        except BaseException as exc:
            self.errors.append(exc)

    def _conversation(self) -> None:
        try:
            started = time.monotonic()
            while self._running(self.rounds, started):
                message = f"round {self.rounds};".encode()
                self.long.sendall(message)
                got = b""
                while not got.endswith(message):
                    data = self.long.recv(4096)
                    if not data:
                        raise ConnectionError("EOF mid-conversation")
                    got += data
                with self._progress:
                    self.rounds += 1
                    self._progress.notify_all()
        except BaseException as exc:
            self.errors.append(exc)

    def progress(self) -> tuple[int, int]:
        with self._progress:
            return len(self.replies), self.rounds

    def wait_past(self, mark: tuple[int, int]) -> None:
        """Wait until both streams have moved on from ``mark`` (a ``progress()``)."""
        with self._progress:
            assert self._progress.wait_for(
                lambda: (len(self.replies) > mark[0] and self.rounds > mark[1])
                or bool(self.errors), WAIT), "the stream stalled"
        assert not self.errors, self.errors

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            join(thread)
        self.long.close()
        assert not self.errors, self.errors
        assert self.rounds > 0


@pytest.fixture
def app(tmp_path: Path) -> Path:
    (tmp_path / "tagged.py").write_text(HANDLER.format(tag=b"v1:"))
    return tmp_path


def _env(tmp_path: Path) -> dict[str, str]:
    return {"PYTHONPATH": SRC, "XDG_RUNTIME_DIR": str(tmp_path)}


def test_sighup_loads_new_code_and_rereads_the_config_file(app: Path) -> None:
    """On the default engine only: the supervisor does the reload, and a worker's graceful
    retirement under SIGHUP runs on every engine in test_workers (sighup_restarts_workers)."""
    config = app / "portside.toml"
    config.write_text("workers = 2\n")
    # A long drain: the old workers must outlast the conversation, however slow this machine.
    proc = PortsideProcess(["serve", "tagged:Tagged", "--listen", ":0", "--config", str(config),
                            "--control", str(app / "ctl.sock"), "--drain-timeout", "60"],
                           env=_env(app), cwd=app)
    stream = None
    try:
        port = int(proc.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        proc.wait_for(r"serving tagged:Tagged with 2 worker")
        assert echo_once(port, b"x") == b"v1:x"
        stream = Stream(port, (b"v1:", b"version-two:"))
        # New code (a different size, so no stale bytecode can pass for it) and settings.
        (app / "tagged.py").write_text(HANDLER.format(tag=b"version-two:"))
        config.write_text("workers = 3\n")
        before = stream.progress()
        proc.signal(signal.SIGHUP)
        proc.wait_for(r"SIGHUP: reloading")
        proc.wait_for(r"reload complete: 3 worker\(s\) serving")
        assert echo_once(port, b"x") == b"version-two:x"
        stream.wait_past(before)
        stream.wait_past(stream.progress())  # and still going after the reload
        stream.finish()
        assert b"version-two:" in stream.replies
        proc.wait_for(r"reload: retiring worker \d+", seen_too=True)
        assert not any("shutting down" in line for line in proc.lines), proc.lines
        proc.signal(signal.SIGTERM)
        assert proc.wait_exit() == 0
        assert "reload(s)" in proc.lines[-1] and "1 reload(s)" in proc.lines[-1]
    finally:
        if stream is not None:
            stream.stop.set()
        proc.kill()


def test_reload_with_broken_code_keeps_the_old_workers(app: Path) -> None:
    proc = PortsideProcess(["serve", "tagged:Tagged", "--listen", ":0", "--workers", "1",
                            "--control", str(app / "ctl.sock")], env=_env(app), cwd=app)
    try:
        port = int(proc.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        proc.wait_for(r"serving tagged:Tagged")
        (app / "tagged.py").write_text("raise RuntimeError('half-deployed')\n")
        proc.signal(signal.SIGHUP)
        proc.wait_for(r"reload failed: .* failed to boot")
        assert echo_once(port, b"x") == b"v1:x"
        proc.signal(signal.SIGTERM)
        assert proc.wait_exit() == 0
    finally:
        proc.kill()


def _wait_gone(pid: int) -> None:
    """Wait (on a pidfd, not a sleep loop) until ``pid``, not our child, has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([fd], [], [], WAIT)
        assert ready, f"process {pid} still runs"
    finally:
        os.close(fd)


@pytest.mark.parametrize("engine", ALL_ENGINES)
def test_usr2_upgrades_the_supervisor_without_dropping_a_connection(app: Path,
                                                                    engine: str) -> None:
    """On every engine: the new supervisor's workers take the inherited sockets over."""
    require_engine(engine)
    control = app / "ctl.sock"
    proc = PortsideProcess(["serve", "tagged:Tagged", "--listen", ":0", "--listen",
                            f"unix:{app / 'app.sock'}", "--workers", "1", "--drain-timeout",
                            "60", "--control", str(control), "--engine", engine],
                           env=_env(app), cwd=app)
    successor = None
    stream = None
    try:
        port = int(proc.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        proc.wait_for(r"serving tagged:Tagged")
        stream = Stream(port, (b"v1:",))
        before = stream.progress()
        proc.signal(signal.SIGUSR2)
        successor = int(proc.wait_for(r"upgrade: new supervisor pid (\d+) is starting")
                        .group(1))
        proc.wait_for(rf"upgrade: new supervisor pid {successor} is serving")
        stream.wait_past(before)
        stream.wait_past(stream.progress())  # and still going once the old one drains
        stream.finish()  # the long conversation ends: the old worker may now exit
        assert proc.proc.wait(WAIT) == 0  # the old one drained and left
        assert echo_once(port, b"after") == b"v1:after"
        assert (app / "app.sock").exists()  # the old one left the new one's socket alone
        done = subprocess.run([sys.executable, "-m", "portside", "ctl", "--control",
                               str(control), "--json", "stats"], capture_output=True, text=True,
                              timeout=WAIT, env={**os.environ, **_env(app)})
        assert done.returncode == 0, done.stderr
        assert f'"pid": {successor}' in done.stdout
        os.kill(successor, signal.SIGTERM)
        _wait_gone(successor)
        successor = None
    finally:
        if stream is not None:
            stream.stop.set()
        if successor is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(successor, signal.SIGKILL)
        proc.kill()


HANGING = """
import os, time

deadline = time.monotonic() + 60  # the test creates the gate long before
while not os.path.exists({gate!r}) and time.monotonic() < deadline:
    time.sleep(0.02)

from portside.examples.echo import EchoHandler

class Tagged(EchoHandler):
    def data_received(self, conn, data):
        conn.write({tag!r} + bytes(data))
"""


def _get(port: int, path: str) -> int:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


class Asker:
    """Asks ``ctl stats`` over and over in a thread: every answer's pid, every failure."""

    def __init__(self, path: Path) -> None:
        from portside.control.client import call

        self.pids: list[int] = []
        self.errors: list[BaseException] = []
        self.stop = threading.Event()

        def ask() -> None:
            for _ in range(100_000):
                if self.stop.is_set():
                    return
                try:
                    self.pids.append(call(str(path), "stats", timeout=5.0)["pid"])
                except BaseException as exc:
                    self.errors.append(exc)
                    return
        self.thread = threading.Thread(target=ask)
        self.thread.start()

    def finish(self) -> set[int]:
        self.stop.set()
        self.thread.join(WAIT)
        assert not self.errors, self.errors
        assert self.pids
        return set(self.pids)


def test_usr2_with_code_that_hangs_at_import_is_given_up_and_ctl_answers_throughout(
        app: Path) -> None:
    """The old supervisor keeps the control socket (and answers on it) while its successor's
    workers hang importing the handler; after upgrade_timeout the successor is stopped, and
    a corrected USR2 then upgrades; ctl is answered all along."""
    control = app / "ctl.sock"
    gate = app / "gate"
    proc = PortsideProcess(["serve", "tagged:Tagged", "--listen", ":0", "--workers", "1",
                            "--upgrade-timeout", "3", "--control", str(control),
                            "--metrics", "127.0.0.1:0"], env=_env(app), cwd=app)
    successor = None
    try:
        port = int(proc.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        metrics = int(proc.wait_for(r"metrics on http://127.0.0.1:(\d+)/", seen_too=True)
                      .group(1))
        proc.wait_for(r"serving tagged:Tagged")
        old = proc.proc.pid
        (app / "tagged.py").write_text(HANGING.format(gate=str(gate), tag=b"v2:"))
        asker = Asker(control)
        signalled = time.monotonic()
        proc.signal(signal.SIGUSR2)
        hung = int(proc.wait_for(r"upgrade: new supervisor pid (\d+) is starting").group(1))
        proc.wait_for(rf"upgrade failed: the new supervisor pid {hung} is not serving after "
                      r"3 s")
        waited = time.monotonic() - signalled
        assert 3.0 <= waited < 4.5, waited
        _wait_gone(hung)
        assert asker.finish() == {old}  # answered throughout, by the old one
        assert _get(metrics, "/readyz") == 200  # the old one's metrics port, still its own
        assert echo_once(port, b"x") == b"v1:x"
        assert not any(f"pid {hung} is serving" in line for line in proc.lines)

        gate.touch()  # the corrected code imports at once
        asker = Asker(control)
        proc.signal(signal.SIGUSR2)
        successor = int(proc.wait_for(r"upgrade: new supervisor pid (\d+) is starting")
                        .group(1))
        proc.wait_for(rf"upgrade: new supervisor pid {successor} is serving")
        assert proc.proc.wait(WAIT) == 0
        assert asker.finish() <= {old, successor}
        from portside.control.client import call

        assert call(str(control), "stats")["pid"] == successor
        assert echo_once(port, b"x") == b"v2:x"
        assert _get(metrics, "/readyz") == 200  # the same port, handed over
        os.kill(successor, signal.SIGTERM)
        _wait_gone(successor)
        assert not control.exists()  # the successor claimed it, and removed it at exit
        successor = None
    finally:
        if successor is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(successor, signal.SIGKILL)
        proc.kill()


def test_usr2_hands_the_default_control_socket_over_under_the_new_pid(
        app: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the default control socket (PID.sock in the private directory), ``ctl`` with no
    flags finds one server throughout an upgrade, and afterwards the new one, by its pid."""
    from portside.control.client import call
    from portside.control.paths import resolve, running_servers

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(app))
    proc = PortsideProcess(["serve", "tagged:Tagged", "--listen", ":0", "--workers", "1"],
                           env=_env(app), cwd=app)
    successor = None
    try:
        proc.wait_for(r"serving tagged:Tagged")
        old = proc.proc.pid
        pids: list[int] = []
        errors: list[BaseException] = []
        stop = threading.Event()

        def ask() -> None:
            for _ in range(100_000):
                if stop.is_set():
                    return
                try:
                    pids.append(call(resolve(None, None), "stats", timeout=5.0)["pid"])
                except BaseException as exc:
                    errors.append(exc)
                    return
        asker = threading.Thread(target=ask)
        asker.start()
        proc.signal(signal.SIGUSR2)
        successor = int(proc.wait_for(r"upgrade: new supervisor pid (\d+) is starting")
                        .group(1))
        proc.wait_for(rf"upgrade: new supervisor pid {successor} is serving")
        assert proc.proc.wait(WAIT) == 0
        stop.set()
        asker.join(WAIT)
        assert not errors, errors
        assert set(pids) <= {old, successor} and old in pids
        (found,) = running_servers()
        assert found.pid == successor and found.path.endswith(f"/{successor}.sock")
        assert call(found.path, "stats")["pid"] == successor
        os.kill(successor, signal.SIGTERM)
        _wait_gone(successor)
        assert running_servers() == []
        successor = None
    finally:
        if successor is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(successor, signal.SIGKILL)
        proc.kill()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(WAIT)
    try:
        yield sock, path
    finally:
        sock.close()


def _next(sock: socket.socket, wanted: str) -> str:
    """The next datagram that contains ``wanted`` (waits up to WAIT seconds)."""
    while True:
        message = sock.recv(4096).decode()
        if wanted in message.split("\n"):
            return message


#: In one process the engine's loop sends READY and the watchdog's pings: every engine. With
#: workers the supervisor (no engine) sends them: the default engine is enough.
@pytest.mark.parametrize(("workers", "engine"), [*((None, engine) for engine in ALL_ENGINES),
                                                 ("1", "auto")])
def test_systemd_notify(tmp_path: Path, notify_socket: tuple[socket.socket, str],
                        workers: str | None, engine: str) -> None:
    require_engine(engine)
    sock, path = notify_socket
    args = ["echo", "--listen", ":0", "--control", str(tmp_path / "ctl.sock"),
            "--engine", engine]
    if workers:
        args += ["--workers", workers]
    proc = PortsideProcess(args, env={**_env(tmp_path), "NOTIFY_SOCKET": path,
                                      "WATCHDOG_USEC": "200000"})
    try:
        ready = _next(sock, "READY=1")
        assert f"MAINPID={proc.proc.pid}" in ready
        _next(sock, "WATCHDOG=1")
        _next(sock, "WATCHDOG=1")  # again: a period, not a one-off
        if workers:
            proc.signal(signal.SIGHUP)
            assert "MONOTONIC_USEC=" in _next(sock, "RELOADING=1")
            _next(sock, "READY=1")
        proc.signal(signal.SIGTERM)
        _next(sock, "STOPPING=1")
        assert proc.wait_exit() == 0
    finally:
        proc.kill()
