"""``portside top`` in a real terminal: tmux runs it in an 80-column pane, the screen is
captured and checked, and a key press quits it."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from proc import PortsideProcess

WAIT = 20.0
SRC = str(Path(__file__).resolve().parent.parent / "src")


class Tmux:
    """A private tmux server (its own socket name) with one session."""

    def __init__(self, name: str) -> None:
        if shutil.which("tmux") is None:
            raise AssertionError("tmux is missing: scripts/test installs it")
        self.name = name

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", "-L", self.name, "-f", "/dev/null", *args],
                              capture_output=True, text=True, timeout=WAIT)

    def screen(self) -> list[str]:
        return self.run("capture-pane", "-p", "-t", "top").stdout.splitlines()

    def alive(self) -> bool:
        return self.run("has-session", "-t", "top").returncode == 0

    def until(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}; screen: {self.screen()}")
            time.sleep(0.05)  # the terminal is polled: it has no event to wait on


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    terminal = Tmux(f"portside-test-{os.getpid()}-{tmp_path.name}")
    try:
        yield terminal
    finally:
        terminal.run("kill-server")


def test_top_in_an_80_column_terminal(tmux: Tmux, tmp_path: Path) -> None:
    control = tmp_path / "ctl"
    proc = PortsideProcess(["echo", "--data-first-port", "0", "--immediate-port", "0",
                            "--defer-accept", "0", "--workers", "2", "--control", str(control)])
    held: list[socket.socket] = []
    try:
        ports = proc.ports()
        for _ in range(2):
            proc.wait_for("started worker", seen_too=True)
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", ports["immediate"]), timeout=WAIT)
            sock.sendall(b"hi")
            assert sock.recv(2) == b"hi"
            held.append(sock)
        command = (f"env PYTHONPATH={shlex.quote(SRC)} TERM=xterm-256color "
                   f"{shlex.quote(sys.executable)} -m portside top --control "
                   f"{shlex.quote(str(control))} --interval 0.3")
        started = tmux.run("new-session", "-d", "-s", "top", "-x", "80", "-y", "30", command)
        assert started.returncode == 0, started.stderr
        tmux.until(lambda: any("connections: 3 of 3" in line for line in tmux.screen()),
                   "top never showed the three connections")
        tmux.until(lambda: any("conn/s" in line and line.split()[0] == "portside"
                               for line in tmux.screen()) or
                   any(" c/s" in line for line in tmux.screen()), "no rates yet")
        screen = tmux.screen()
        text = "\n".join(screen)
        assert all(len(line) <= 80 for line in screen), screen
        assert "…" not in text
        assert screen[0].startswith("portside ") and "accepting" in screen[0]
        assert "q quit" in screen[1]
        for needle in ("immediate", "data-first", "limit", "peak", "supervisor",
                       f"127.0.0.1:{held[0].getsockname()[1]}"):
            assert needle in text, (needle, screen)
        immediate = next(line for line in screen if line.startswith("immediate"))
        assert "accepting" in immediate
        tmux.run("send-keys", "-t", "top", "s")  # sort by bytes in
        tmux.until(lambda: any("by bytes_in" in line for line in tmux.screen()),
                   "the sort key did not change")
        tmux.run("send-keys", "-t", "top", "q")
        tmux.until(lambda: not tmux.alive(), "q did not quit top")
    finally:
        for sock in held:
            sock.close()
        proc.kill()


def test_top_shows_a_hostile_peer_path_escaped(tmux: Tmux) -> None:
    """A peer's Unix socket path with ESC sequences, a newline and ``[/]``: shown escaped on
    one row, the pane's title untouched, no rich MarkupError; ``?`` shows the keys' help."""
    from test_peer_text import HOSTILE, hostile_client

    directory = tempfile.mkdtemp(prefix="ps", dir="/tmp")  # a Unix path is short
    server, control = os.path.join(directory, "s"), os.path.join(directory, "c")
    proc = PortsideProcess(["echo", "--listen", f"immediate@unix:{server}",
                            "--control", control])
    try:
        proc.wait_for("listening on")
        with hostile_client(directory, server):
            command = (f"env -u COLUMNS PYTHONPATH={shlex.quote(SRC)} TERM=xterm-256color "
                       f"{shlex.quote(sys.executable)} -m portside top --control "
                       f"{shlex.quote(control)} --interval 0.3")
            started = tmux.run("new-session", "-d", "-s", "top", "-x", "200", "-y", "30",
                               command)
            assert started.returncode == 0, started.stderr
            tmux.until(lambda: any("connections: 1 of 1" in line for line in tmux.screen()),
                       "top never showed the connection")
            tmux.until(lambda: any("\\x1b]0;PWNED\\x07" in line for line in tmux.screen()),
                       "the path is not shown escaped")
            screen = tmux.screen()
            assert not any(line.startswith("1999-12-31") for line in screen), screen
            title = tmux.run("display-message", "-p", "-t", "top", "#{pane_title}").stdout
            assert "PWNED" not in title, title
            assert "? help" in screen[1], screen
            tmux.run("send-keys", "-t", "top", "?")
            tmux.until(lambda: any("show or hide this help" in line for line in tmux.screen()),
                       "? showed no help")
            tmux.run("send-keys", "-t", "top", "q")
            tmux.until(lambda: not tmux.alive(), "q did not quit top")
        assert HOSTILE  # the path the client was bound to
    finally:
        proc.kill()
        shutil.rmtree(directory, ignore_errors=True)


def test_top_once_prints_no_key_hints(tmp_path: Path) -> None:
    control = tmp_path / "ctl"
    proc = PortsideProcess(["echo", "--listen", "immediate@:0", "--control", str(control)])
    try:
        proc.wait_for("listening on")
        result = subprocess.run([sys.executable, "-m", "portside", "top", "--once",
                                 "--control", str(control)], capture_output=True, text=True,
                                timeout=WAIT, env={**os.environ, "PYTHONPATH": SRC})
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("portside "), result.stdout
        assert "q quit" not in result.stdout and "? help" not in result.stdout, result.stdout
    finally:
        proc.kill()
