"""The control socket and ``portside ctl``, with real processes, sockets and signals: where the
socket lives and who may use it, finding the server meant, clients that misbehave, and the
operator's commands (single process and under --workers)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ALL_ENGINES, HAVE_COMPILED, HAVE_UVLOOP, assert_on_time, join, require
from proc import PortsideProcess, echo_once

from portside.control import protocol
from portside.control.client import call
from portside.control.paths import ControlSocket
from portside.control.server import ControlServer
from portside.engine.epoll import EpollReactor
from portside.errors import ControlError

WAIT = 20.0
SRC = str(Path(__file__).resolve().parent.parent / "src")


@pytest.fixture
def runtime(tmp_path: Path) -> dict[str, str]:
    """An environment whose private control directory lives under this test's tmp_path."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    return {"XDG_RUNTIME_DIR": str(run)}


def ctl(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "portside", "ctl", *args], capture_output=True,
                          text=True, timeout=WAIT, env={**os.environ, **env},
                          stdin=subprocess.DEVNULL)
    if check:
        assert done.returncode == 0, (done.returncode, done.stderr)
        assert "Traceback" not in done.stderr
    return done


def ctl_json(env: dict[str, str], *args: str) -> Any:
    return json.loads(ctl(env, "--json", *args).stdout)


def echo(env: dict[str, str], *extra: str) -> PortsideProcess:
    return PortsideProcess(["echo", "--data-first-port", "0", "--immediate-port", "0",
                            "--defer-accept", "0", *extra], env=env)


def control_path(proc: PortsideProcess) -> str:
    return proc.wait_for(r"control socket (\S+)", seen_too=True).group(1)


def one_line_error(done: subprocess.CompletedProcess[str], status: int, *needles: str) -> None:
    assert done.returncode == status, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    for needle in needles:
        assert needle in done.stderr, done.stderr


# -- where the socket lives ------------------------------------------------------------------------


def test_each_server_has_its_own_private_socket_and_ctl_finds_the_one_meant(
        runtime: dict[str, str]) -> None:
    first, second = echo(runtime), echo(runtime)
    try:
        paths = [control_path(first), control_path(second)]
        directory = Path(runtime["XDG_RUNTIME_DIR"]) / "portside"
        assert paths == [str(directory / f"{first.proc.pid}.sock"),
                         str(directory / f"{second.proc.pid}.sock")]
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        for path in paths:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        first.ports(), second.ports()
        several = ctl(runtime, "stats", check=False)
        one_line_error(several, 1, "2 portside servers are running", "--pid",
                       f"pid {first.proc.pid}", f"pid {second.proc.pid}")
        assert ctl_json(runtime, "--pid", str(second.proc.pid), "stats")["pid"] == \
            second.proc.pid
        assert ctl_json(runtime, "stats", "--pid", str(first.proc.pid))["pid"] == first.proc.pid
        listed = ctl_json(runtime, "servers")
        assert [entry["pid"] for entry in listed] == sorted([first.proc.pid, second.proc.pid])
        first.signal(signal.SIGTERM)
        assert first.wait_exit() == 0
        assert not os.path.exists(paths[0]) and os.path.exists(paths[1])
        assert ctl_json(runtime, "stats")["pid"] == second.proc.pid  # the only one left
    finally:
        first.kill()
        second.kill()
    none = ctl(runtime, "stats", check=False)
    one_line_error(none, 1, "no portside server is running")


def test_ctl_servers_says_when_there_are_none_and_sees_control_path_servers(
        runtime: dict[str, str], tmp_path: Path) -> None:
    """``ctl servers`` exits 1 when none runs (as pgrep does: scripts can test it), with one
    line, or ``[]`` with --json; a server started with ``--control PATH`` elsewhere is listed
    and found without flags, and leaves nothing behind when it stops."""
    none = ctl(runtime, "servers", check=False)
    one_line_error(none, 1, "no portside server is running")
    assert none.stdout == ""
    none_json = ctl(runtime, "--json", "servers", check=False)
    assert none_json.returncode == 1 and json.loads(none_json.stdout) == []
    elsewhere = tmp_path / "elsewhere.sock"
    proc = echo(runtime, "--control", str(elsewhere))
    try:
        proc.ports()
        listed = ctl_json(runtime, "servers")
        assert listed == [{"pid": proc.proc.pid, "control": str(elsewhere)}]
        shown = ctl(runtime, "servers")
        assert f"pid {proc.proc.pid}  {elsewhere}" in shown.stdout
        assert ctl_json(runtime, "stats")["pid"] == proc.proc.pid  # the only one: no flags
        proc.signal(signal.SIGTERM)
        assert proc.wait_exit() == 0
    finally:
        proc.kill()
    assert ctl(runtime, "servers", check=False).returncode == 1
    directory = Path(runtime["XDG_RUNTIME_DIR"]) / "portside"
    assert list(directory.iterdir()) == []  # its link went with it


def test_sockets_of_dead_servers_are_swept_and_nothing_else(runtime: dict[str, str]) -> None:
    directory = Path(runtime["XDG_RUNTIME_DIR"]) / "portside"
    directory.mkdir(mode=0o700)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = directory / f"{gone.pid}.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(stale))  # left behind by a server killed with SIGKILL, say
    alive = directory / f"{os.getpid()}.sock"  # refused, but its pid runs: not provably dead
    with socket.socket(socket.AF_UNIX) as closed:
        closed.bind(str(alive))
    keep = directory / "99999999.sock"
    keep.write_text("not a socket")
    proc = echo(runtime)
    try:
        control_path(proc)
        assert not stale.exists()
        assert alive.exists() and keep.read_text() == "not a socket"
    finally:
        proc.kill()
    alive.unlink()


@pytest.mark.parametrize("problem", ["mode", "group", "symlink", "owner"])
def test_an_unsafe_directory_is_refused_by_server_and_ctl(runtime: dict[str, str],
                                                            tmp_path: Path, problem: str) -> None:
    directory = Path(runtime["XDG_RUNTIME_DIR"]) / "portside"
    if problem == "mode":
        directory.mkdir(mode=0o755)
        directory.chmod(0o755)
        needle = "mode 0755"
    elif problem == "group":  # group-writable only: others have nothing, still refused
        directory.mkdir(mode=0o720)
        directory.chmod(0o720)
        needle = "mode 0720"
    elif problem == "symlink":
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir(mode=0o700)
        directory.symlink_to(elsewhere)
        needle = "not a directory"
    else:
        require(os.getuid() == 0, "root (giving a directory to another user)")
        directory.mkdir(mode=0o700)
        os.chown(directory, 65534, 65534)
        needle = "belongs to uid 65534"
    done = subprocess.run([sys.executable, "-m", "portside", "echo", "--data-first-port", "0",
                           "--immediate-port", "0"], capture_output=True, text=True,
                          timeout=WAIT, env={**os.environ, **runtime})
    one_line_error(done, 2, needle)
    one_line_error(ctl(runtime, "stats", check=False), 1, needle)
    one_line_error(ctl(runtime, "--pid", "1", "stats", check=False), 1, needle)


def test_a_regular_file_at_the_control_path_is_never_removed(tmp_path: Path) -> None:
    precious = tmp_path / "notes.txt"
    precious.write_text("keep me")
    done = subprocess.run([sys.executable, "-m", "portside", "echo", "--data-first-port", "0",
                           "--immediate-port", "0", "--control", str(precious)],
                          capture_output=True, text=True, timeout=WAIT)
    one_line_error(done, 2, "not a socket", "not removing it")
    assert precious.read_text() == "keep me"


def test_a_stale_socket_is_replaced_and_a_live_one_is_left_alone(tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(stale))  # bound, never listening, closed: connecting is refused
    proc = echo({}, "--control", str(stale))
    try:
        proc.ports()
        assert ctl_json({}, "--control", str(stale), "stats")["pid"] == proc.proc.pid
    finally:
        proc.kill()
    live = tmp_path / "live.sock"
    with socket.socket(socket.AF_UNIX) as holder:
        holder.bind(str(live))
        holder.listen(1)
        done = subprocess.run([sys.executable, "-m", "portside", "echo", "--data-first-port",
                               "0", "--immediate-port", "0", "--control", str(live)],
                              capture_output=True, text=True, timeout=WAIT)
        one_line_error(done, 2, "in use by another server")
        assert stat.S_ISSOCK(live.stat().st_mode)


@pytest.mark.parametrize("workers", [None, "2"], ids=["single", "workers"])
@pytest.mark.parametrize("explicit", [True, False], ids=["explicit", "default"])
def test_a_failed_start_removes_the_control_socket(runtime: dict[str, str], tmp_path: Path,
                                                     workers: str | None,
                                                     explicit: bool) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        path = tmp_path / "ctl.sock"
        args = ["echo", "--data-first-port", "0", "--immediate-port",
                str(busy.getsockname()[1])]
        args += ["--control", str(path)] if explicit else []
        args += ["--workers", workers] if workers else []
        done = subprocess.run([sys.executable, "-m", "portside", *args], capture_output=True,
                              text=True, timeout=WAIT, env={**os.environ, **runtime})
    one_line_error(done, 2, "address already in use")
    assert not path.exists()
    directory = Path(runtime["XDG_RUNTIME_DIR"]) / "portside"
    assert not directory.exists() or list(directory.iterdir()) == []


# -- who may talk to whom --------------------------------------------------------------------------


def require_root_for_other_users() -> None:
    """These tests act as other uids (a forked child calls setuid), which only root may do: as
    anyone else they skip, and in CI (which runs scripts/test as root) they fail instead."""
    require(os.getuid() == 0, "root (to act as a second and third uid through setuid)")


def _fork_as_nobody(action: Callable[[], None]) -> int:
    return _fork_as(65534, action)


def _fork_as(uid: int, action: Callable[[], None]) -> int:
    """Start ``action`` in a forked child as ``uid``; the child's pid (it exits 0 when the
    action passed, 1 with the traceback on stderr when not)."""
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.setgid(uid)
            os.setuid(uid)
            action()
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    return pid


def _exit_status(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory both users can reach (pytest's own are closed to others)."""
    path = Path(tempfile.mkdtemp(prefix="portside-shared-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_ctl_refuses_a_socket_served_by_another_user(shared_dir: Path) -> None:
    require_root_for_other_users()
    path = shared_dir / "squatted.sock"
    ready_read, ready_write = os.pipe()

    def squat() -> None:  # a second user, serving fake replies at the path
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path))
            os.chmod(path, 0o666)
            sock.listen(4)
            os.write(ready_write, b"x")
            for _ in range(2):
                client, _ = sock.accept()
                with client:
                    client.settimeout(WAIT)
                    if client.recv(1000):  # only root's ctl sends a request
                        client.sendall(protocol.reply_ok({"pid": 1}))

    def victim() -> None:  # a third user whose ctl is pointed at the path
        with pytest.raises(ControlError, match=r"served by uid 65534.*refusing"):
            call(str(path), "stats", timeout=WAIT)

    squatter = _fork_as_nobody(squat)
    try:
        assert select.select([ready_read], [], [], WAIT)[0], "the squatter did not start"
        assert os.read(ready_read, 1) == b"x"
        assert _exit_status(_fork_as(65533, victim)) == 0
        # Root may talk to a server of any user (a service's DynamicUser, say).
        assert ctl_json({}, "--control", str(path), "stats") == {"pid": 1}
    finally:
        assert _exit_status(squatter) == 0
        os.close(ready_read)
        os.close(ready_write)


def test_the_server_refuses_a_client_of_another_user(shared_dir: Path) -> None:
    require_root_for_other_users()
    path = shared_dir / "ctl.sock"
    proc = echo({}, "--control", str(path))
    try:
        proc.ports()
        os.chmod(path, 0o666)  # as a careless operator might: the uid check still holds

        def ask() -> None:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(WAIT)
                sock.connect(str(path))
                # Turned away at once, before it could ask for anything.
                reply = json.loads(sock.makefile("rb").readline())
                assert reply["ok"] is False and "uid 65534 may not" in reply["error"]

        assert _exit_status(_fork_as_nobody(ask)) == 0
        proc.wait_for("refused a client of uid 65534", seen_too=True)
        assert ctl_json({}, "--control", str(path), "stats")["pid"] == proc.proc.pid
    finally:
        proc.kill()


# -- clients that misbehave ------------------------------------------------------------------------


def _exchange(path: str, data: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(WAIT)
        sock.connect(path)
        sock.sendall(data)
        line = sock.makefile("rb").readline()
        return dict(json.loads(line))


def test_bad_requests_get_error_replies_and_no_traceback(tmp_path: Path) -> None:
    path = str(tmp_path / "ctl.sock")
    proc = echo({}, "--control", path)
    try:
        proc.ports()
        for bad in (b'{"v": ' + b"1" * 10_000 + b', "command": "stats"}\n',
                    b"[" * 50_000 + b"\n",
                    b'{"v": 1, "command": "connections", "args": {"limit": 1e999}}\n',
                    b'{"v": 1, "command": "close", "args": {"id": {"a": [[[[1]]]]}}}\n',
                    b"\xff\n",
                    b"x" * (protocol.MAX_REQUEST + 10) + b"\n"):
            reply = _exchange(path, bad)
            assert reply["ok"] is False and reply["error"], bad[:40]
        assert ctl_json({}, "--control", path, "stats")["pid"] == proc.proc.pid
        proc.signal(signal.SIGTERM)
        assert proc.wait_exit() == 0
        assert "Traceback" not in proc.text()
    finally:
        proc.kill()


def test_idle_clients_cannot_lock_ctl_out(tmp_path: Path) -> None:
    path = str(tmp_path / "ctl.sock")
    proc = echo({}, "--control", path)
    silent = []
    try:
        proc.ports()
        for _ in range(40):  # more than the server keeps (16), all saying nothing
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(path)
            silent.append(sock)
        started = time.monotonic()
        assert ctl_json({}, "--control", path, "--timeout", "5", "stats")["pid"] == \
            proc.proc.pid
        assert time.monotonic() - started < 5.0  # long before any idle timeout ran out
    finally:
        for sock in silent:
            sock.close()
        proc.kill()


class _Target:
    def control(self, request: protocol.Request, respond: Callable[[bytes], None]) -> None:
        if request.command == "connections":  # a big reply
            respond(protocol.reply_ok({"connections": ["x" * 1000] * 1000}))
        else:
            respond(protocol.reply_ok({"command": request.command}))


@pytest.fixture
def control_server(tmp_path: Path) -> Iterator[str]:
    """A ControlServer with a 0.8 s client deadline on portside's epoll loop in a thread."""
    reactor = EpollReactor()
    control = ControlSocket(str(tmp_path / "ctl.sock"))
    server = ControlServer(control, _Target(), client_timeout=0.8)
    server.attach(reactor)
    thread = threading.Thread(target=reactor.run, daemon=True)
    thread.start()
    try:
        yield control.path
    finally:
        reactor.call_soon_threadsafe(reactor.stop)
        join(thread, WAIT)
        server.close()
        reactor.close()
    assert not os.path.exists(control.path)


def test_a_silent_client_gets_a_timeout_reply_on_time(control_server: str) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(WAIT)
        sock.connect(control_server)
        started = time.monotonic()
        reply = json.loads(sock.makefile("rb").readline())
        waited = time.monotonic() - started
        assert sock.recv(10) == b""
    assert reply["ok"] is False and "no whole request within 0.8 s" in reply["error"]
    assert_on_time(waited, 0.8)  # neither early nor late


def test_a_client_that_asks_in_time_is_served_and_gets_a_new_period(
        control_server: str) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(WAIT)
        sock.connect(control_server)
        lines = sock.makefile("rb")
        for _ in range(3):  # 3 x 0.4 s > 0.8 s: each reply renews the deadline
            time.sleep(0.4)  # the client's own think time, not a synchronisation
            sock.sendall(protocol.request("stats"))
            assert json.loads(lines.readline())["result"] == {"command": "stats"}


def test_a_client_that_takes_no_replies_is_cut_off(control_server: str) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(WAIT)
        sock.connect(control_server)
        for _ in range(50):  # 50 replies of 1 MB each asked for, none read for now
            sock.sendall(protocol.request("connections"))
        started = time.monotonic()
        received = 0
        time.sleep(1.5)  # the client's stubbornness: three times the server's deadline
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
        assert time.monotonic() - started < WAIT
    assert received < 2 * 1_010_000  # the server held at most one reply, not fifty


# -- the operator's commands -----------------------------------------------------------------------


@pytest.fixture(params=[*ALL_ENGINES, "2"], ids=[*ALL_ENGINES, "workers"])
def served(request: pytest.FixtureRequest, tmp_path: Path
           ) -> Iterator[tuple[PortsideProcess, dict[str, int], str]]:
    """A server in one process on each engine, or with two workers (on the default engine:
    the runtime commands reach workers through the supervisor, the same on every engine)."""
    if request.param == "uvloop":
        require(HAVE_UVLOOP, "uvloop (the uvloop engine)")
    if request.param == "compiled":
        require(HAVE_COMPILED, "the compiled engine")
    path = str(tmp_path / "ctl.sock")
    workers = ["--workers", request.param] if request.param == "2" else []
    engine = ["--engine", request.param] if request.param in ALL_ENGINES else []
    proc = echo({}, "--control", path, "--drain-timeout", "5", *workers, *engine)
    try:
        ports = proc.ports()
        if workers:  # every worker answers before the test begins
            for _ in range(2):
                proc.wait_for("started worker", seen_too=True)
            wait_until(lambda: len(ctl_json({}, "--control", path, "stats")["workers"]) == 2)
        yield proc, ports, path
    finally:
        proc.kill()


def wait_until(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)  # re-asking a remote process; bounded by the deadline


def test_connections_are_listed_filtered_closed_and_aborted(
        served: tuple[PortsideProcess, dict[str, int], str]) -> None:
    proc, ports, path = served
    socks = []
    opened = time.monotonic()
    try:
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", ports["immediate"]), timeout=WAIT)
            sock.sendall(b"hello")
            assert sock.recv(5) == b"hello"
            socks.append(sock)
            time.sleep(0.01)  # ages apart by more than the listing's millisecond rounding
        listing = ctl_json({}, "--control", path, "connections", "--listener", "immediate")
        assert listing["total"] == 3
        ours = {f"127.0.0.1:{sock.getsockname()[1]}": sock for sock in socks}
        # The oldest first (a worker's connections, with workers: each lists its own in order).
        if len(ctl_json({}, "--control", path, "stats")["workers"]) == 1:
            assert [entry["peer"] for entry in listing["connections"]] == list(ours)
        ages = [entry["age"] for entry in listing["connections"]]
        assert ages == sorted(ages, reverse=True), ages
        entries = {entry["peer"]: entry for entry in listing["connections"]}
        assert set(entries) == set(ours)
        for entry in entries.values():
            assert entry["state"] == "open" and entry["bytes_in"] == 5
            assert entry["bytes_out"] == 5 and entry["queued"] == 0
            assert 0 <= entry["age"] <= time.monotonic() - opened + 0.01, entry
        assert ctl_json({}, "--control", path, "connections", "--listener",
                        "data-first")["total"] == 0
        first, second = list(entries)[:2]
        one = ctl_json({}, "--control", path, "connections", "--peer", first)
        assert [entry["peer"] for entry in one["connections"]] == [first]
        readable = ctl({}, "--control", path, "connections").stdout
        assert "3 of 3 connection(s)" in readable and first in readable
        closed = ctl({}, "--control", path, "close", entries[first]["id"]).stdout
        assert f"closed connection {entries[first]['id']} from {first}" in closed
        assert ours[first].recv(10) == b""  # FIN: a graceful close
        ctl({}, "--control", path, "abort", entries[second]["id"])
        with pytest.raises(ConnectionResetError):
            ours[second].recv(10)
        missing = ctl({}, "--control", path, "close", "999999", check=False)
        one_line_error(missing, 1, "999999")
        proc.wait_for(r"control: uid \d+ asked for abort id=", seen_too=True)
    finally:
        for sock in socks:
            sock.close()


def test_pause_and_resume_one_listener(
        served: tuple[PortsideProcess, dict[str, int], str]) -> None:
    proc, ports, path = served
    result = ctl_json({}, "--control", path, "pause", "immediate")
    assert result["listeners"]["immediate"] == "paused"
    assert result["listeners"]["data-first"] == "accepting"
    states = {entry["name"]: entry for entry in
              ctl_json({}, "--control", path, "stats")["listeners"]}
    assert states["immediate"]["accept_state"] == "paused"
    assert states["immediate"]["accepting"] is False
    assert echo_once(ports["data-first"], b"still served") == b"still served"
    with socket.create_connection(("127.0.0.1", ports["immediate"]), timeout=WAIT) as waiting:
        waiting.sendall(b"queued")
        waiting.settimeout(0.3)
        with pytest.raises(TimeoutError):  # in the backlog: nobody accepts it while paused
            waiting.recv(10)
        waiting.settimeout(WAIT)
        ctl({}, "--control", path, "resume", "immediate")
        assert waiting.recv(10) == b"queued"
    bad = ctl({}, "--control", path, "pause", "nope", check=False)
    one_line_error(bad, 1, "no listener named 'nope'", "immediate")
    proc.wait_for(r"control: uid \d+ asked for pause listener=immediate", seen_too=True)


def test_max_connections_and_log_level_at_run_time(
        served: tuple[PortsideProcess, dict[str, int], str]) -> None:
    proc, _, path = served
    assert ctl({}, "--control", path, "max-connections", "1", "--listener",
               "immediate").stdout.strip() == "immediate: max_connections 1"
    listeners = {entry["name"]: entry
                 for entry in ctl_json({}, "--control", path, "stats")["listeners"]}
    workers = len(ctl_json({}, "--control", path, "stats")["workers"])
    assert listeners["immediate"]["max_connections"] == workers  # summed over the workers
    assert listeners["data-first"]["max_connections"] == 10_000 * workers
    assert ctl({}, "--control", path, "log-level", "debug").stdout.strip() == "log level: debug"
    proc.wait_for(r"control: uid \d+ asked for log-level level=debug", seen_too=True)
    bad = ctl({}, "--control", path, "max-connections", "0", check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


@pytest.mark.parametrize("release", ["close", "raise"])
def test_a_lowered_ceiling_holds_newcomers_until_a_connection_closes(
        served: tuple[PortsideProcess, dict[str, int], str], release: str) -> None:
    """At a ceiling lowered at run time, a newcomer waits in the backlog until a connection
    closes, or until the ceiling is raised again (accepting resumes at once either way)."""
    _, ports, path = served
    workers = len(ctl_json({}, "--control", path, "stats")["workers"])
    ctl({}, "--control", path, "max-connections", "1", "--listener", "immediate")
    held = []
    try:
        for _ in range(workers):  # one per worker: each is then at its ceiling of 1
            sock = socket.create_connection(("127.0.0.1", ports["immediate"]), timeout=WAIT)
            sock.sendall(b"in")
            assert sock.recv(2) == b"in"
            held.append(sock)
        with socket.create_connection(("127.0.0.1", ports["immediate"]),
                                      timeout=WAIT) as waiting:
            waiting.sendall(b"wait")
            wait_until(lambda: "at-ceiling" in {
                entry["name"]: entry for entry in
                ctl_json({}, "--control", path, "stats")["listeners"]}["immediate"][
                    "accept_state"])
            waiting.settimeout(0.3)
            with pytest.raises(TimeoutError):  # still in the backlog
                waiting.recv(10)
            waiting.settimeout(WAIT)
            if release == "close":
                held.pop().close()
            else:
                ctl({}, "--control", path, "max-connections", "10", "--listener", "immediate")
            assert waiting.recv(10) == b"wait"
        peak = {entry["name"]: entry for entry in
                ctl_json({}, "--control", path, "stats")["listeners"]}["immediate"]
        assert peak["peak_connections"] >= workers
    finally:
        for sock in held:
            sock.close()


def test_drain_stops_accepting_and_reports_until_done(
        served: tuple[PortsideProcess, dict[str, int], str]) -> None:
    _, ports, path = served
    held = socket.create_connection(("127.0.0.1", ports["immediate"]), timeout=WAIT)
    held.sendall(b"hold")
    assert held.recv(4) == b"hold"
    drain = subprocess.Popen([sys.executable, "-m", "portside", "ctl", "--control", path,
                              "drain"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        assert drain.stdout is not None
        first = drain.stdout.readline()
        assert re.search(r"accepting stopped, 1 connection\(s\) open", first), first
        stats = ctl_json({}, "--control", path, "stats")
        assert stats["draining"] is True and stats["accepting_paused"] is True
        held.close()
        out, err = drain.communicate(timeout=WAIT)
        assert drain.returncode == 0, err
        assert "drained: no connections open" in out
        assert "Traceback" not in err
    finally:
        held.close()
        if drain.poll() is None:
            drain.kill()
            drain.communicate()
    ctl({}, "--control", path, "resume")
    assert echo_once(ports["immediate"]) == b"ping"


def test_ctl_bad_flags_are_one_line(tmp_path: Path) -> None:
    for args in (["--timeout", "0", "stats"], ["stats", "--pid", "0"], ["frobnicate"],
                 ["close"]):
        done = ctl({}, *args, check=False)
        one_line_error(done, 2)


def test_ctl_imports_only_what_it_needs(runtime: dict[str, str]) -> None:
    """``portside ctl`` is called by scripts and probes: it must not import the settings, the
    server, the engine, prometheus_client or rich, nor dataclasses and logging (which cost it
    more than the rest of its imports together). ``-X importtime`` lists every import."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "portside", "ctl",
                           "servers"], capture_output=True, text=True, timeout=WAIT,
                          env={**os.environ, **runtime}, stdin=subprocess.DEVNULL)
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "portside.control.command" in imported
    heavy = {"portside.config", "portside.settings", "portside.cli", "portside.server",
             "portside.engine", "prometheus_client", "rich", "dataclasses", "logging"}
    assert not heavy & imported, heavy & imported
