"""The RESP example: the parser without sockets, then real redis-cli and redis-benchmark."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from proc import PortsideProcess

from portside.errors import ProtocolError
from portside.protocols.resp import Command, RespFramer, encode_array

WAIT = 30.0


def encode_command(args: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


commands = st.lists(st.lists(st.binary(max_size=40), min_size=1, max_size=5), max_size=20)


@given(commands, st.lists(st.integers(0, 5000), max_size=10))
def test_any_split_parses_the_same_commands(cmds: list[Command], cuts: list[int]) -> None:
    stream = b"".join(encode_command(c) for c in cmds)
    bounds = [0, *sorted(c % (len(stream) + 1) for c in cuts), len(stream)]
    framer = RespFramer()
    out: list[Command] = []
    for start, end in itertools.pairwise(bounds):
        out += framer.feed(stream[start:end])
    framer.eof()
    assert out == cmds


def test_inline_commands() -> None:
    assert RespFramer().feed(b"PING\r\nSET a  b\nGET a\r\n") == [
        [b"PING"], [b"SET", b"a", b"b"], [b"GET", b"a"]]


@pytest.mark.parametrize("bad", [
    b"*1\r\n+PING\r\n",  # not a bulk string
    b"*1\r\n$-5\r\n",  # negative bulk length
    b"*1\r\n$3\r\nabcXY",  # missing CRLF after the bulk
    b"*x\r\n",  # not a number
    b"*99999999\r\n",  # too many arguments
    b"*1\r\n$999999999999\r\n",  # bulk too large
    b"x" * 70_000,  # inline line without end, too long
])
def test_malformed_input_is_a_protocol_error(bad: bytes) -> None:
    with pytest.raises(ProtocolError):
        RespFramer().feed(bad)


def test_reply_encoding() -> None:
    assert encode_array([b"a", None]) == b"*2\r\n$1\r\na\r\n$-1\r\n"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: scripts/test installs Debian's redis-tools")
        pytest.skip(f"{name} not installed (scripts/test installs redis-tools)")
    return path


@pytest.fixture(params=["epoll", "asyncio"])
def resp_port(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> Iterator[int]:
    proc = PortsideProcess(["resp", "--port", "0", "--engine", request.param,
                            "--control", os.path.join(tmp_path, "ctl")])
    try:
        yield int(proc.wait_for(r"listening on [\d.]+:(\d+)").group(1))
    finally:
        proc.kill()


def cli(port: int, *args: str) -> str:
    done = subprocess.run([_tool("redis-cli"), "-p", str(port), *args], capture_output=True,
                          text=True, timeout=WAIT, check=True)
    return done.stdout.strip()


def test_redis_cli_talks_to_portside_resp(resp_port: int) -> None:
    assert cli(resp_port, "PING") == "PONG"
    assert cli(resp_port, "SET", "greeting", "hello world") == "OK"
    assert cli(resp_port, "GET", "greeting") == "hello world"
    assert cli(resp_port, "INCR", "counter") == "1"
    assert cli(resp_port, "INCR", "counter") == "2"
    assert cli(resp_port, "INCR", "greeting") == "ERR value is not an integer or out of range"
    assert cli(resp_port, "ECHO", "ping\npong") == "ping\npong"
    assert cli(resp_port, "DEL", "greeting", "counter", "nothing") == "2"
    assert cli(resp_port, "GET", "greeting") == ""
    assert "unknown command" in cli(resp_port, "FROB")
    # Pipelined through one connection, with an offloaded slow command in the middle.
    piped = subprocess.run([_tool("redis-cli"), "-p", str(resp_port)], input=(
        "SET k 1\nDEBUG SLEEP 0.2\nINCR k\nGET k\nPING\n"), capture_output=True, text=True,
        timeout=WAIT, check=True)
    assert piped.stdout.split() == ["OK", "OK", "2", "2", "PONG"]


def test_pipelined_replies_keep_order_around_offloaded_work(resp_port: int) -> None:
    with socket.create_connection(("127.0.0.1", resp_port), timeout=WAIT) as sock:
        sock.sendall(encode_command([b"DEBUG", b"SLEEP", b"0.1"]) + b"PING\r\n" +
                     encode_command([b"ECHO", b"after"]))
        expected = b"+OK\r\n+PONG\r\n$5\r\nafter\r\n"
        got = b""
        while len(got) < len(expected):
            got += sock.recv(1024)
        assert got == expected


def test_malformed_resp_gets_an_error_then_close(resp_port: int) -> None:
    with socket.create_connection(("127.0.0.1", resp_port), timeout=WAIT) as sock:
        sock.sendall(b"PING\r\n*1\r\n+oops\r\n")
        got = b""
        while data := sock.recv(1024):
            got += data
        assert got.startswith(b"+PONG\r\n-ERR Protocol error")
    assert cli(resp_port, "PING") == "PONG"  # the server is fine


@pytest.mark.parametrize("extra", [[], ["-P", "16"], ["-k", "0"]])
def test_redis_benchmark_runs_clean(resp_port: int, extra: list[str]) -> None:
    done = subprocess.run([_tool("redis-benchmark"), "-p", str(resp_port), "-t", "ping,set,get",
                           "-n", "2000", "-c", "10", "-q", *extra],
                          capture_output=True, text=True, timeout=120, check=True)
    results = [line for line in done.stdout.replace("\r", "\n").splitlines()
               if "requests per second" in line]
    assert len(results) == 4, done.stdout  # PING_INLINE, PING_MBULK, SET, GET
    assert "ERR" not in done.stdout


def test_pipelined_batch_then_quit_sends_every_reply(resp_port: int) -> None:
    with socket.create_connection(("127.0.0.1", resp_port), timeout=WAIT) as sock:
        sock.sendall(b"PING\r\n" * 50 + b"QUIT\r\nPING\r\n")  # one read, replies corked
        got = b""
        while data := sock.recv(4096):
            got += data
        assert got == b"+PONG\r\n" * 50 + b"+OK\r\n"  # nothing after QUIT, nothing lost
