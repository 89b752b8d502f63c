"""The ``portside`` command, run as a real subprocess: bad input, and the echo example's life."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ENGINES, WAIT, recv_exactly, recv_until_eof
from proc import PortsideProcess

SRC = str(Path(__file__).resolve().parent.parent / "src")


Env = dict[str, str]


@pytest.fixture
def env(tmp_path: Path) -> Env:
    """The subprocess environment: this source tree, and a private runtime directory so that
    default per-user paths (the control socket) never collide with another run."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    result = dict(os.environ)
    result["PYTHONPATH"] = os.pathsep.join(filter(None, [SRC, result.get("PYTHONPATH")]))
    result["PYTHONUNBUFFERED"] = "1"
    result["XDG_RUNTIME_DIR"] = str(runtime)
    return result


def run_cli(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "portside", *args], capture_output=True,
                          text=True, timeout=WAIT, env=env, stdin=subprocess.DEVNULL)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port with a live listener on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield int(sock.getsockname()[1])


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stderr.endswith("\n")
    line = lines[0]
    assert line.startswith("portside"), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert result.stdout == ""
    return line


# -- bad input: exit status 2, one line on stderr, no traceback ------------------------------------


def test_port_in_use(env: Env, busy_port: int) -> None:
    result = run_cli(env, "echo", "--data-first-port", "0", "--immediate-port", str(busy_port))
    assert_one_line_error(result, "address already in use")


def _bad(*args: str, needles: tuple[str, ...]) -> object:
    return pytest.param(list(args), list(needles), id=" ".join(args))


@pytest.mark.parametrize(("args", "needles"), [
    _bad("--first-data-timeout", "-1", needles=("--first-data-timeout", "'-1'", ">= 0")),
    _bad("--first-data-timeout", "soon", needles=("--first-data-timeout", "'soon'")),
    _bad("--drain-timeout", "nan", needles=("--drain-timeout", "'nan'")),
    _bad("--engine", "nope", needles=("--engine", "'nope'", "epoll")),
    _bad("--data-first-port", "70000", needles=("--data-first-port", "70000", "0-65535")),
    _bad("--immediate-port", "-5", needles=("--immediate-port", "-5")),
    _bad("--max-connections", "0", needles=("--max-connections", "'0'")),
    _bad("--log-level", "loud", needles=("--log-level", "'loud'")),
])
def test_bad_argument(env: Env, args: list[str], needles: list[str]) -> None:
    result = run_cli(env, "echo", "--data-first-port", "0", "--immediate-port", "0", *args)
    assert_one_line_error(result, *needles)


def test_unbindable_address(env: Env) -> None:
    # 203.0.113.0/24 is TEST-NET-3: no local interface has it, so bind fails (no traffic).
    result = run_cli(env, "echo", "--host", "203.0.113.1", "--data-first-port", "0",
                     "--immediate-port", "0")
    assert_one_line_error(result, "cannot listen", "cannot assign requested address")


def test_missing_and_unknown_command(env: Env) -> None:
    assert_one_line_error(run_cli(env), "required")
    assert_one_line_error(run_cli(env, "frobnicate"), "frobnicate")
    assert_one_line_error(run_cli(env, "echo", "--no-such-flag"), "--no-such-flag")


def test_echo_help(env: Env) -> None:
    result = run_cli(env, "echo", "--help")
    assert result.returncode == 0, result.stderr
    assert "--first-data-timeout" in result.stdout
    assert "--engine" in result.stdout
    assert "(default: 5.0)" in result.stdout  # defaults come from the config classes
    assert result.stderr == ""


# -- the echo example, end to end ------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_echo_command_serves_and_stops_on_sigterm(env: Env, engine: str) -> None:
    cli = PortsideProcess(["echo", "--data-first-port", "0", "--immediate-port", "0",
                           "--defer-accept", "0", "--first-data-timeout", "0.5", "--engine",
                           engine], env=env)
    try:
        data_first = int(cli.wait_for(
            r"listening on 127\.0\.0\.1:(\d+) \(data-first\)$").group(1))
        immediate = int(cli.wait_for(
            r"listening on 127\.0\.0\.1:(\d+) \(immediate\)$").group(1))
        assert data_first > 0 and immediate > 0 and data_first != immediate

        # Both listeners echo.
        for port in (data_first, immediate):
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
                sock.sendall(b"hello %d" % port)
                expected = b"hello %d" % port
                assert recv_exactly(sock, len(expected)) == expected
                sock.shutdown(socket.SHUT_WR)
                assert recv_until_eof(sock) == b""

        # A silent data-first connection is closed after the first-data timeout, with a log line.
        with socket.create_connection(("127.0.0.1", data_first), timeout=WAIT) as silent:
            silent_port = silent.getsockname()[1]
            line = cli.wait_for(r"no data within")
            assert re.search(r"\bINFO\b", line.string), line.string
            assert f"127.0.0.1:{silent_port}" in line.string
            assert f"127.0.0.1:{data_first}" in line.string
            assert "0.5 s" in line.string
            with contextlib.suppress(ConnectionResetError):  # an abortive close is fine too
                assert silent.recv(100) == b""

        # A conversation in progress when SIGTERM arrives is finished, not cut off.
        talker = socket.create_connection(("127.0.0.1", immediate), timeout=WAIT)
        with talker:
            talker.sendall(b"before the signal")
            assert recv_exactly(talker, 17) == b"before the signal"
            os.kill(cli.proc.pid, signal.SIGTERM)
            cli.wait_for(r"SIGTERM: shutting down gracefully")
            payload = bytes(range(256)) * 1024  # 256 KiB: more than the socket buffers hold
            errors: list[BaseException] = []

            def send() -> None:
                try:
                    talker.sendall(payload)
                    talker.shutdown(socket.SHUT_WR)
                except BaseException as exc:
                    errors.append(exc)

            sender = threading.Thread(target=send)
            sender.start()
            assert recv_until_eof(talker) == payload
            sender.join(WAIT)
            assert not errors, errors

        assert cli.wait_exit() == 0, cli.lines
        assert not any("Traceback" in line for line in cli.lines), cli.lines
        assert not any(" ERROR " in line or " WARNING " in line for line in cli.lines), cli.lines
    finally:
        cli.kill()
