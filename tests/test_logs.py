"""What the log says: the start line, the final totals, one line per connection when asked,
JSON for log shippers; and the library's own signal handling (serve() and run())."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ENGINES, WAIT, require
from proc import PortsideProcess, echo_once

from portside import Engine, ListenerConfig, Server, ServerConfig
from portside.examples.echo import EchoHandler

SRC = str(Path(__file__).resolve().parent.parent / "src")


@pytest.mark.parametrize("engine", ENGINES)
def test_start_line_connection_lines_and_totals(tmp_path: Path, engine: str) -> None:
    proc = PortsideProcess(["echo", "--listen", "immediate@:0", "--log-connections",
                            "--engine", engine, "--max-connections", "77",
                            "--control", str(tmp_path / "ctl")])
    try:
        start = proc.wait_for(r"serving portside\.examples\.echo:EchoHandler in one process")
        for words in (f"engine {engine}", "TLS off", "PROXY protocol off", "at most 77"):
            assert words in start.string, start.string
        port = int(proc.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        assert echo_once(port, b"twelve bytes") == b"twelve bytes"
        line = proc.wait_for(r"portside\.connections: closed peer=127\.0\.0\.1:(\d+) "
                             r"listener=immediate duration=([\d.]+) bytes_in=12 "
                             r"bytes_out=12 reason=(\S+)")
        assert float(line.group(2)) < WAIT
        assert line.group(3) in ("closed", "peer-eof")
        proc.signal(signal.SIGTERM)
        assert proc.wait_exit() == 0
        assert re.search(r"stopped: 1 connection\(s\) accepted, 12 bytes in, 12 bytes out",
                         proc.lines[-1]), proc.lines[-1]
    finally:
        proc.kill()


def test_no_connection_lines_by_default(tmp_path: Path) -> None:
    proc = PortsideProcess(["echo", "--listen", "immediate@:0",
                            "--control", str(tmp_path / "ctl")])
    try:
        port = int(proc.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        assert echo_once(port) == b"ping"
        proc.signal(signal.SIGTERM)
        assert proc.wait_exit() == 0
        assert proc.count("portside.connections") == 0
    finally:
        proc.kill()


def test_json_log_under_workers(tmp_path: Path) -> None:
    proc = PortsideProcess(["echo", "--listen", "immediate@:0", "--workers", "2",
                            "--log-format", "json", "--control", str(tmp_path / "ctl")])
    try:
        proc.wait_for(r'"message": "serving ')
        proc.signal(signal.SIGTERM)
        assert proc.wait_exit() == 0
        documents = [json.loads(line) for line in proc.lines]
        roles = {(d.get("role"), d["worker"]) for d in documents}
        assert ("supervisor", None) in roles
        assert {(None, 1), (None, 2)} <= roles, roles
        assert all(isinstance(d["pid"], int) and d["time"] and d["level"] for d in documents)
    finally:
        proc.kill()


def test_process_titles(tmp_path: Path) -> None:
    require(importlib.util.find_spec("setproctitle") is not None,
            "setproctitle (pip install -e '.[test]')")
    proc = PortsideProcess(["echo", "--listen", "immediate@:0", "--workers", "1",
                            "--control", str(tmp_path / "ctl")])
    try:
        worker = int(proc.wait_for(r"worker 1 \(pid (\d+)\) is serving").group(1))
        assert Path(f"/proc/{worker}/cmdline").read_bytes().startswith(b"portside: worker 1")
        assert Path(f"/proc/{proc.proc.pid}/cmdline").read_bytes().startswith(
            b"portside: supervisor")
        proc.signal(signal.SIGTERM)
        assert proc.wait_exit() == 0
    finally:
        proc.kill()


def test_serve_takes_a_shutdown_trigger() -> None:
    async def main() -> None:
        stop = asyncio.Event()
        server = Server(EchoHandler(), [ListenerConfig()], ServerConfig(engine=Engine.ASYNCIO))
        server.start()
        port = server.listeners[0].address
        task = asyncio.ensure_future(server.serve(shutdown_trigger=stop.wait))
        await asyncio.get_running_loop().run_in_executor(None, server.started.wait, WAIT)
        reply = await asyncio.get_running_loop().run_in_executor(
            None, echo_once, int(str(port).rpartition(":")[2]), b"hi")
        assert reply == b"hi"
        stop.set()
        await asyncio.wait_for(task, WAIT)

    asyncio.run(main())


SCRIPT = """
import asyncio, sys
from portside import Engine, ListenerConfig, Server, ServerConfig
from portside.examples.echo import EchoHandler

class Announce(EchoHandler):
    def server_started(self, server):
        print("started", flush=True)

server = Server(Announce(), [ListenerConfig()], ServerConfig(engine=sys.argv[1]))
if sys.argv[2] == "serve":
    asyncio.run(server.serve(install_signal_handlers=True))
else:
    server.run()
print("stopped", flush=True)
"""


def _library(engine: str, how: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SCRIPT), engine, how],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={"PYTHONPATH": SRC})
    assert proc.stdout is not None
    assert proc.stdout.readline() == "started\n"
    return proc


def test_serve_installs_graceful_signal_handling_when_asked() -> None:
    proc = _library("asyncio", "serve")
    try:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=WAIT)
        assert out == "stopped\n" and proc.returncode == 0
    finally:
        proc.kill()


@pytest.mark.parametrize("engine", ["epoll", "asyncio"])
def test_library_run_leaves_sighup_alone(engine: str) -> None:
    """Server.run() is not a supervisor: SIGHUP keeps its usual meaning (here, the default:
    the process ends), rather than being swallowed with a warning."""
    proc = _library(engine, "run")
    try:
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(WAIT) == -signal.SIGHUP
    finally:
        proc.kill()
        if proc.stdout is not None:
            proc.stdout.close()


def test_single_process_command_logs_sighup_and_usr2_without_dying(tmp_path: Path) -> None:
    proc = PortsideProcess(["echo", "--listen", "immediate@:0",
                            "--control", str(tmp_path / "ctl")])
    try:
        port = int(proc.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        proc.signal(signal.SIGHUP)
        proc.wait_for(r"SIGHUP ignored: reloading needs worker processes")
        proc.signal(signal.SIGUSR2)
        proc.wait_for(r"SIGUSR2 ignored: upgrading needs worker processes")
        assert echo_once(port) == b"ping"
        proc.signal(signal.SIGTERM)
        assert proc.wait_exit() == 0
    finally:
        proc.kill()
