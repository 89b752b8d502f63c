"""The ``portside`` command, run as a real subprocess: bad input, and the echo example's life."""

from __future__ import annotations

import contextlib
import json
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
from conftest import ENGINES, WAIT, join, recv_exactly, recv_until_eof
from proc import PortsideProcess, echo_once

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


# -- bad input: exit status 2, one line on stderr, no traceback, nothing left behind ---------------


def test_port_in_use(env: Env, busy_port: int) -> None:
    result = run_cli(env, "echo", "--listen", "data-first@:0", "--listen", f":{busy_port}")
    assert_one_line_error(result, "address already in use")
    assert_nothing_left(env)


@pytest.mark.parametrize("workers", [[], ["--workers", "1"]], ids=["single", "workers"])
def test_metrics_port_in_use(env: Env, busy_port: int, workers: list[str]) -> None:
    """The control socket is made before metrics fail to bind: it must not be left behind."""
    result = run_cli(env, "echo", "--listen", ":0", "--metrics", f":{busy_port}", *workers)
    assert_one_line_error(result, "cannot serve metrics", "in use")
    assert_nothing_left(env)


def assert_nothing_left(env: Env) -> None:
    """No control socket (or any other file) left in the private runtime directory (an empty
    private directory for control sockets may stay)."""
    left = [os.path.join(root, name) for root, _, names in os.walk(env["XDG_RUNTIME_DIR"])
            for name in names]
    assert left == []


def _bad(*args: str, needles: tuple[str, ...]) -> object:
    return pytest.param(list(args), list(needles), id=" ".join(args))


@pytest.mark.parametrize(("args", "needles"), [
    _bad("--first-data-timeout", "-1", needles=("--first-data-timeout", "'-1'", "> 0")),
    _bad("--first-data-timeout", "soon", needles=("--first-data-timeout", "'soon'")),
    _bad("--first-data-timeout", "1e300", needles=("--first-data-timeout", "at most")),
    _bad("--drain-timeout", "nan", needles=("--drain-timeout", "'nan'")),
    _bad("--engine", "nope", needles=("--engine", "'nope'", "epoll", "compiled")),
    _bad("--listen", "127.0.0.1:70000", needles=("--listen", "70000", "0-65535")),
    _bad("--listen", "127.0.0.1:-5", needles=("--listen", "-5")),
    _bad("--listen", "::1:80", needles=("--listen", "[::1]:80")),
    _bad("--listen", "unix:", needles=("--listen", "empty path")),
    _bad("--listen", "sometimes@:0", needles=("--listen", "'sometimes'", "data-first")),
    _bad("--listen", "fd://x", needles=("--listen", "fd://N")),
    _bad("--metrics", "127.0.0.1:99999", needles=("--metrics", "99999", "0-65535")),
    _bad("--metrics", "nowhere", needles=("--metrics", "HOST:PORT")),
    _bad("--defer-accept", "2147483648", needles=("--defer-accept", "2147483648",
                                                  "2147483647")),
    _bad("--backlog", "2147483648", needles=("--backlog", "2147483647")),
    _bad("--backlog", "0", needles=("--backlog", "'0'")),
    _bad("--heartbeat-timeout", "0", needles=("--heartbeat-timeout", "> 0")),
    _bad("--max-connections", "0", needles=("--max-connections", "'0'")),
    _bad("--trusted-proxies", "10.0.0.0/33", needles=("--trusted-proxies", "10.0.0.0/33")),
    _bad("--workers", "0", needles=("--workers", "'0'")),
    _bad("--log-level", "loud", needles=("--log-level", "'loud'")),
    _bad("--write-limit", "1", needles=("write_limit", ">= write_high_water")),
])
def test_bad_argument(env: Env, args: list[str], needles: list[str]) -> None:
    result = run_cli(env, "echo", "--listen", ":0", *args)
    assert_one_line_error(result, *needles)
    assert_nothing_left(env)


def test_ctl_timeout_must_be_positive(env: Env) -> None:
    assert_one_line_error(run_cli(env, "ctl", "--timeout", "0", "stats"), "--timeout", "> 0")


def test_unbindable_address(env: Env) -> None:
    # 203.0.113.0/24 is TEST-NET-3: no local interface has it, so bind fails (no traffic).
    result = run_cli(env, "echo", "--listen", "203.0.113.1:0")
    assert_one_line_error(result, "cannot listen", "cannot assign requested address")
    assert_nothing_left(env)


def test_unknown_command_and_flag(env: Env) -> None:
    assert_one_line_error(run_cli(env, "frobnicate"), "frobnicate")
    assert_one_line_error(run_cli(env, "echo", "--no-such-flag"), "--no-such-flag")


def test_bare_command_prints_usage_and_version(env: Env) -> None:
    bare = run_cli(env)
    assert bare.returncode == 2
    assert bare.stdout.startswith("usage: portside")
    for command in ("echo", "serve", "resp", "ctl", "top"):
        assert command in bare.stdout
    version = run_cli(env, "--version")
    assert version.returncode == 0
    # The version, and the engine a server runs by default (compiled where it built).
    assert re.fullmatch(r"portside \S+, engine compiled, Python 3\.\S+\n", version.stdout), \
        version.stdout


def test_echo_help_shows_flags_aliases_and_defaults(env: Env) -> None:
    result = run_cli(env, "echo", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for flag in ("--listen", "--bind", "--first-data-timeout", "--engine", "--backlog",
                 "--graceful-timeout", "--drain-timeout", "--certfile", "--tls-cert",
                 "--keyfile", "--ssl-keyfile", "--write-limit", "--trusted-proxies",
                 "--log-format", "--log-connections", "--config", "--workers"):
        assert flag in text, flag
    assert "(default: 5.0)" in text  # defaults come from the declarations
    assert ":PORT (127.0.0.1)" in text  # what :PORT means is said
    assert "seed" not in text and "config.py" not in text  # no internal jargon
    assert result.stderr == ""


def _module(directory: Path, name: str, body: str) -> None:
    (directory / f"{name}.py").write_text(body)


HANDLER = """
from portside.examples.echo import EchoHandler

class Shout(EchoHandler):
    def data_received(self, conn, data):
        conn.write(bytes(data).upper())
"""


@pytest.mark.parametrize(("body", "needles"), [
    ("raise RuntimeError('no database')\n", ("RuntimeError", "no database", "broken.py:1")),
    ("import sys\nsys.exit(5)\n", ("SystemExit",)),
    ("def oops(:\n", ("SyntaxError", "(broken.py:1)")),  # the user's line, not importlib's
    ("x = 1\n\ndef oops(:\n", ("SyntaxError", "(broken.py:3)")),
    (HANDLER.replace("Shout", "Shouter"), ("has no class 'Shout'", "did you mean 'Shouter'")),
    ("Shout = 3\n", ("not a portside Handler subclass", "found int")),
    ("import no_such_module_anywhere\n", ("no_such_module_anywhere",)),
    ("class Shout:\n    pass\n", ("not a portside Handler subclass",)),
    (HANDLER + "    def __init__(self):\n        raise ValueError('bad key')\n",
     ("Shout()", "ValueError", "bad key")),
])
def test_handler_that_cannot_load_is_one_line(env: Env, tmp_path: Path, body: str,
                                              needles: tuple[str, ...]) -> None:
    _module(tmp_path, "broken", body)
    result = run_cli(env, "serve", "broken:Shout", "--listen", ":0", "--app-dir",
                     str(tmp_path))
    assert_one_line_error(result, *needles)
    assert_nothing_left(env)


def test_settings_from_file_and_environment(env: Env, tmp_path: Path) -> None:
    config = tmp_path / "portside.toml"
    config.write_text("max-connections = 0\n")
    assert_one_line_error(run_cli(env, "echo", "--config", str(config)),
                          "portside.toml", "max-connections")
    config.write_text("nonsense = 1\n")
    assert_one_line_error(run_cli(env, "echo", "--config", str(config)), "'nonsense'")
    assert_one_line_error(run_cli({**env, "PORTSIDE_DEFER_ACCEPT": "soon"}, "echo"),
                          "PORTSIDE_DEFER_ACCEPT", "'soon'")
    # Flags win over the environment, which wins over the file.
    config.write_text('listen = ["immediate@127.0.0.1:0"]\nidle_timeout = 30\n'
                      'log_format = "json"\n')
    cli = PortsideProcess(["echo", "--config", str(config), "--idle-timeout", "0.2"],
                          env={**env, "PORTSIDE_LOG_LEVEL": "debug"})
    try:
        line = cli.wait_for(r'"message": "listening on 127\.0\.0\.1:\d+ \(immediate\)"')
        document = json.loads(line.string)
        assert document["level"] == "info" and document["pid"] == cli.proc.pid
        port = int(re.search(r":(\d+) ", document["message"]).group(1))  # type: ignore[union-attr]
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
            # Closed after 0.2 s idle (the flag), not 30 s (the file).
            assert recv_until_eof(sock) == b""
        cli.signal(signal.SIGTERM)
        assert cli.wait_exit() == 0
    finally:
        cli.kill()


def test_serve_imports_from_the_current_directory(env: Env, tmp_path: Path) -> None:
    _module(tmp_path, "shouting", HANDLER)
    env = {**env, "PYTHONPATH": SRC}  # not tmp_path: like gunicorn, the directory is enough
    cli = PortsideProcess(["serve", "shouting:Shout", "--bind", "127.0.0.1:0"], env=env,
                          cwd=tmp_path)
    try:
        port = int(cli.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        assert echo_once(port, b"hello") == b"HELLO"
        cli.signal(signal.SIGTERM)
        assert cli.wait_exit() == 0
    finally:
        cli.kill()


@pytest.mark.parametrize("workers", [[], ["--workers", "1"]], ids=["single", "workers"])
def test_listen_forms(env: Env, tmp_path: Path, workers: list[str]) -> None:
    """:PORT, [::1]:PORT, unix:PATH and fd://N on one server; --metrics :PORT is loopback."""
    inherited = socket.socket()
    inherited.bind(("127.0.0.1", 0))
    inherited.listen(8)
    path = tmp_path / "echo.sock"
    fd = inherited.fileno()
    cli = PortsideProcess(["echo", "--listen", "data-first@:0", "--listen", "[::1]:0",
                           "--listen", f"unix:{path}", "--listen", f"fd://{fd}",
                           "--defer-accept", "0", "--metrics", ":0", *workers], env=env,
                          pass_fds=[fd])
    try:
        data_first = int(cli.wait_for(r"listening on 127\.0\.0\.1:(\d+) \(data-first\)")
                         .group(1))
        v6 = int(cli.wait_for(r"listening on \[::1\]:(\d+)").group(1))
        cli.wait_for(rf"listening on unix:{re.escape(str(path))}")
        cli.wait_for(rf"listening on 127\.0\.0\.1:{inherited.getsockname()[1]}")
        cli.wait_for(r"metrics on http://127\.0\.0\.1:\d+/metrics", seen_too=True)
        assert echo_once(data_first, b"a") == b"a"
        assert echo_once(v6, b"b", host="::1") == b"b"
        assert echo_once(inherited.getsockname()[1], b"c") == b"c"
        with socket.socket(socket.AF_UNIX) as unix:
            unix.settimeout(WAIT)
            unix.connect(str(path))
            unix.sendall(b"d")
            unix.shutdown(socket.SHUT_WR)
            assert recv_until_eof(unix) == b"d"
        cli.signal(signal.SIGTERM)
        assert cli.wait_exit() == 0
        assert not path.exists()  # the socket file it made is gone
    finally:
        cli.kill()
        inherited.close()


def test_settings_table_is_current() -> None:
    """docs/settings.md is generated from the declarations: regenerate it with
    python -m portside.settings > docs/settings.md"""
    from portside.settings import table

    committed = (Path(__file__).resolve().parent.parent / "docs" / "settings.md").read_text()
    assert committed == table()


def test_ctl_imports_little(env: Env) -> None:
    """portside ctl must answer fast: parsing its command line imports no server or engine."""
    code = ("import sys\nfrom portside.cli import build_parser\n"
            "build_parser()\nprint(' '.join(sorted(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=WAIT, check=True)
    modules = set(result.stdout.split())
    for heavy in ("portside.server", "portside.engine.connection", "portside.engine.epoll",
                  "portside.workers.supervisor", "portside.handler", "asyncio", "ssl"):
        assert heavy not in modules, heavy


# -- the echo example, end to end ------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_echo_command_serves_and_stops_on_sigterm(env: Env, engine: str) -> None:
    cli = PortsideProcess(["echo", "--listen", "data-first@:0", "--listen", "immediate@:0",
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
            join(sender)
            assert not errors, errors

        assert cli.wait_exit() == 0, cli.lines
        assert not any("Traceback" in line for line in cli.lines), cli.lines
        assert not any(" ERROR " in line or " WARNING " in line for line in cli.lines), cli.lines
    finally:
        cli.kill()


def test_flags_are_never_abbreviated_and_typos_get_the_closest(env: Env) -> None:
    # argparse's prefix matching took --worker for --workers: a typo must not start servers.
    line = assert_one_line_error(run_cli(env, "echo", "--listen", ":0", "--worker", "2"),
                                 "--worker 2", "did you mean --workers?")
    assert line.startswith("portside echo: error: unrecognized arguments"), line
    assert_one_line_error(run_cli(env, "echo", "--listen", ":0", "--max-conn=3"),
                          "did you mean --max-connections?")
    assert_one_line_error(run_cli(env, "ctl", "stats", "--jsn"), "did you mean --json?")
    assert_one_line_error(run_cli(env, "top", "--onc"), "did you mean --once?")
    far = assert_one_line_error(run_cli(env, "echo", "--zzzzzz"), "--zzzzzz")
    assert "did you mean" not in far
    assert_nothing_left(env)


def test_an_unknown_portside_variable_warns_once_with_the_closest(env: Env,
                                                                  tmp_path: Path) -> None:
    cli = PortsideProcess(["echo", "--listen", "immediate@:0", "--control",
                           str(tmp_path / "ctl")],
                          env={**env, "PORTSIDE_MAX_CONECTIONS": "3",
                               "PORTSIDE_IDLE_TIMEOUT": "9"})
    try:
        cli.wait_for("listening on")
        assert cli.count("PORTSIDE_") == 1, cli.lines
        assert re.search(r"WARNING portside: ignoring unknown environment variable "
                         r"PORTSIDE_MAX_CONECTIONS \(did you mean PORTSIDE_MAX_CONNECTIONS\?\)$",
                         cli.text(), re.MULTILINE), cli.lines
    finally:
        cli.kill()


def test_every_portside_variable_in_the_source_is_known() -> None:
    """The variables portside sets for itself, and the relay's settings (which the relay hands
    its workers as variables), never draw the warning."""
    from portside.config import RelayConfig, settings_of
    from portside.settings import unknown_environment

    names = {declared.env for declared in settings_of(RelayConfig)}
    for path in Path(SRC, "portside").rglob("*.py"):
        names |= set(re.findall(r'"(PORTSIDE_[A-Z0-9_]+)"', path.read_text()))
    assert "PORTSIDE_WORKER" in names and "PORTSIDE_UPSTREAM" in names
    assert unknown_environment({name: "" for name in names}) == []


def test_a_bad_value_in_the_config_file_is_said_once(env: Env, tmp_path: Path) -> None:
    config = tmp_path / "portside.toml"
    config.write_text('workers = "two"\n')
    line = assert_one_line_error(run_cli(env, "echo", "--config", str(config)),
                                 "portside.toml", "workers", "or auto")
    assert line.count("'two'") == 1, line


def test_a_config_file_that_is_not_utf8_is_one_line(env: Env, tmp_path: Path) -> None:
    config = tmp_path / "portside.toml"
    config.write_bytes(b"workers = 2\n# caf\xe9\n")
    for result in (run_cli(env, "echo", "--config", str(config)),
                   run_cli({**env, "PORTSIDE_CONFIG": str(config)}, "echo")):
        assert_one_line_error(result, "portside.toml", "line 2", "0xe9", "UTF-8")
    assert_nothing_left(env)


def test_ctl_into_a_closed_pipe_ends_quietly(env: Env, tmp_path: Path) -> None:
    """``portside ctl stats | head -0``: the reader is gone before a byte is written (the read
    end is closed first, so the test does not race head); status 141 as after SIGPIPE."""
    control = str(tmp_path / "ctl")
    server = PortsideProcess(["echo", "--listen", "immediate@:0", "--control", control],
                             env=env)
    try:
        server.wait_for("listening on")
        for args in (["ctl", "--control", control, "stats"],
                     ["ctl", "--control", control, "connections", "--json"],
                     ["top", "--control", control, "--once"]):
            read, write = os.pipe()
            os.close(read)
            try:
                result = subprocess.run([sys.executable, "-m", "portside", *args], stdout=write,
                                        stderr=subprocess.PIPE, text=True, timeout=WAIT,
                                        env=env, stdin=subprocess.DEVNULL)
            finally:
                os.close(write)
            assert (result.returncode, result.stderr) == (141, ""), (args, result)
    finally:
        server.kill()
