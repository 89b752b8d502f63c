"""Text a peer chose (its Unix socket path, a protocol error's byte) never reaches a log, ``ctl``
or ``top`` raw: control characters are escaped (``portside.text.printable``) and rich never
reads it as markup. The client is a real Unix socket bound to a hostile path."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ENGINES, WAIT, recv_exactly
from hypothesis import given
from hypothesis import strategies as st
from proc import PortsideProcess

from portside.config import address_label
from portside.text import printable

SRC = str(Path(__file__).resolve().parent.parent / "src")
#: A path that sets the terminal's title, clears the screen, breaks rich's markup and forges a
#: log line, all at once.
HOSTILE = "\x1b]0;PWNED\x07\x1b[2J[/]\x9b\n1999-12-31 00:00:00,000 [1] ERROR portside: FAKE"
ESCAPED = "\\x1b]0;PWNED\\x07\\x1b[2J[/]\\x9b\\x0a1999-12-31"


@given(st.text())
def test_printable_escapes_every_control_and_only_those(text: str) -> None:
    shown = printable(text)
    assert shown.isprintable()
    assert printable(shown) == shown  # escaping twice changes nothing
    if text.isprintable():
        assert shown == text


def test_printable_forms() -> None:
    assert printable("a\nb\x1b\x7f\x85\u202e") == "a\\x0ab\\x1b\\x7f\\x85\\u202e"
    assert printable(b"ok\xff\x00") == "ok\\xff\\x00"  # a bad byte shown as the byte
    assert address_label(os.fsdecode(b"/tmp/\xff\n")) == "/tmp/\\xff\\x0a"
    assert address_label(b"\x00abstract\x1b") == "@abstract\\x1b"
    assert address_label(("::1", 80)) == "[::1]:80"


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A directory with a short path: a Unix socket path has at most 107 bytes."""
    directory = tempfile.mkdtemp(prefix="ps", dir="/tmp")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def hostile_client(directory: str, server: str) -> Iterator[socket.socket]:
    """A client bound to ``HOSTILE`` in ``directory``, connected to ``server``, echo checked."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(WAIT)
        path = os.path.join(directory, HOSTILE)
        os.makedirs(os.path.dirname(path), exist_ok=True)  # "[/]" holds a directory
        sock.bind(path)
        sock.connect(server)
        sock.sendall(b"hi")
        assert recv_exactly(sock, 2) == b"hi"
        yield sock


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "portside", *args], capture_output=True,
                          text=True, timeout=WAIT, env=env, stdin=subprocess.DEVNULL)


def assert_escaped(text: str) -> None:
    assert "\x1b" not in text and "\x07" not in text and "\x9b" not in text, repr(text)
    assert not any(line.startswith("1999-12-31") for line in text.splitlines()), text
    assert ESCAPED in text, text


@pytest.mark.parametrize("engine", ENGINES)
def test_a_hostile_unix_path_in_the_connection_log(short_dir: str, engine: str) -> None:
    server = os.path.join(short_dir, "s")
    proc = PortsideProcess(["echo", "--listen", f"immediate@unix:{server}", "--engine", engine,
                            "--log-connections", "--control", os.path.join(short_dir, "c")])
    try:
        proc.wait_for("listening on")
        with hostile_client(short_dir, server):
            pass
        line = proc.wait_for(r"portside\.connections: closed peer=").string
        assert_escaped(line)
        assert proc.count("FAKE") == 1  # the one escaped line, no second forged one
    finally:
        proc.kill()


def test_a_hostile_unix_path_in_ctl_and_top(short_dir: str) -> None:
    server, control = os.path.join(short_dir, "s"), os.path.join(short_dir, "c")
    proc = PortsideProcess(["echo", "--listen", f"immediate@unix:{server}",
                            "--control", control])
    try:
        proc.wait_for("listening on")
        with hostile_client(short_dir, server):
            listed = cli("ctl", "--control", control, "connections")
            assert listed.returncode == 0, listed.stderr
            assert_escaped(listed.stdout)
            assert len(listed.stdout.splitlines()) == 3  # header, the one row, the count
            snapshot = cli("top", "--control", control, "--once")
            assert snapshot.returncode == 0, snapshot.stderr  # no MarkupError
            assert_escaped(snapshot.stdout)
    finally:
        proc.kill()


def test_a_resp_protocol_error_logs_the_byte_escaped(tmp_path: Path) -> None:
    proc = PortsideProcess(["resp", "--listen", ":0", "--control", str(tmp_path / "c")])
    try:
        port = int(proc.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
            sock.sendall(b"*1\r\n\x1b")
            reply = sock.recv(4096)
        assert reply == b"-ERR Protocol error: expected '$', got '\\x1b'\r\n", reply
        line = proc.wait_for(r"expected '\$'").string
        assert line.endswith("got '\\x1b'"), repr(line)
    finally:
        proc.kill()
