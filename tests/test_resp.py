"""The RESP example: the parser without sockets, then real redis-cli and redis-benchmark."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import test_parse_work as parse_work
from conftest import HAVE_UVLOOP, IN_CI, assert_on_time, require, require_tool
from hypothesis import given
from hypothesis import strategies as st
from proc import PortsideProcess

from portside.errors import ProtocolError
from portside.examples.resp import Client, RespHandler
from portside.protocols.framing import Framer
from portside.protocols.resp import (
    Command,
    CompiledRespFramer,
    RespFramer,
    compiled_available,
    compiled_unavailable_reason,
    encode_array,
    new_framer,
)

try:
    from portside.examples._resp_store import StoreFramer
except ImportError:  # not built: the tests that need it fail (or skip) and say so
    StoreFramer = None  # type: ignore[assignment,misc]

WAIT = 30.0


def encode_command(args: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


FramerKind = Callable[..., Framer[Command]]
# The reference and its compiled twin: every parser test runs against both.
KINDS: list[FramerKind] = [RespFramer]
if CompiledRespFramer is not None:
    KINDS.append(CompiledRespFramer)
#: Off CI a missing compiled framer skips these; in CI (IN_CI, conftest's one rule) they run,
#: and each one's ``require`` fails: a build that lost the framer is red.
needs_compiled_framer = pytest.mark.skipif(CompiledRespFramer is None and not IN_CI,
                                           reason="the compiled framer is not built")
kinds = pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.__module__.split(".")[-1])


def test_the_compiled_framer_is_built_and_chosen() -> None:
    # CI fails here, rather than quietly testing only the pure-Python framer.
    assert compiled_available(), \
        f"the compiled RESP framer did not build: {compiled_unavailable_reason()}"
    assert type(new_framer()) is CompiledRespFramer
    assert isinstance(new_framer(), Framer)
    assert StoreFramer is not None, "the RESP example's fast path (_resp_store) did not build"
    assert type(RespHandler().make_framer()) is StoreFramer
    assert isinstance(RespHandler().make_framer(), CompiledRespFramer)


def test_the_librarys_compiled_framer_answers_nothing_itself() -> None:
    """The store is the example's: the library's framer hands every command back."""
    assert CompiledRespFramer is not None
    framer = CompiledRespFramer()
    assert framer.serve(b"PING\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", 1 << 20) == \
        (b"", [b"PING"])
    assert framer.resume(b"PING\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", 1 << 20) == \
        (b"", [b"GET", b"k"])
    assert not framer.reading


def test_without_the_compiled_framer_the_reference_serves_and_says_so() -> None:
    """As if ``_resp`` were not built: the example runs on the pure framer, with one log line."""
    code = (
        "import logging, sys\n"
        "sys.modules['portside.protocols._resp'] = None  # as if it were not built\n"
        "logging.basicConfig()\n"
        "from portside.examples.resp import RespHandler\n"
        "framer = RespHandler().make_framer()\n"
        "print(type(framer).__module__, framer.feed(b'PING\\r\\n'))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=WAIT, check=True)
    assert done.stdout.split() == ["portside.protocols.resp", "[[b'PING']]"]
    assert "compiled RESP fast path unavailable" in done.stderr
    assert done.stderr.count("\n") == 1


def split_feed(framer: Framer[Command], stream: bytes,
               cuts: list[int]) -> tuple[list[Command], bool]:
    """The commands ``stream`` gives when cut at ``cuts``, and whether it was a protocol error
    (raised by a feed or at the end)."""
    bounds = [0, *sorted(c % (len(stream) + 1) for c in cuts), len(stream)]
    out: list[Command] = []
    try:
        for start, end in itertools.pairwise(bounds):
            out += framer.feed(memoryview(stream)[start:end])
        framer.eof()
    except ProtocolError:
        return out, True
    return out, False


arguments = st.one_of(st.binary(max_size=40), st.binary(min_size=100, max_size=3000),
                      st.sampled_from([b"", b"\r\n", b"*1\r\n$1\r\nx\r\n", b"$"]))
commands = st.lists(st.lists(arguments, min_size=1, max_size=6), max_size=15)
inline_words = st.lists(st.binary(min_size=1, max_size=10).filter(
    lambda w: not any(c in w for c in b" \t\r\n\x0b\x0c\"'") and not w.startswith(b"*")),
    min_size=1, max_size=4)  # a line that starts with '*' is an array, as in Redis
# A request stream as clients send it: arrays of bulk strings, inline lines, empty arrays.
requests = st.lists(st.one_of(
    commands.map(lambda cmds: [(encode_command(c), c) for c in cmds]),
    inline_words.map(lambda w: [(b" ".join(w) + b"\r\n", w)]),
    st.just([(b"*0\r\n", None)]), st.just([(b"\r\n", None)]),
), max_size=8).map(lambda groups: [item for group in groups for item in group])
cut_lists = st.lists(st.integers(0, 100_000), max_size=30)


@kinds
@given(requests, cut_lists)
def test_any_split_parses_the_same_commands(kind: FramerKind,
                                            stream_items: list[tuple[bytes, Command | None]],
                                            cuts: list[int]) -> None:
    stream = b"".join(wire for wire, _ in stream_items)
    expected = [command for _, command in stream_items if command is not None]
    assert split_feed(kind(), stream, cuts) == (expected, False)


@kinds
@given(requests)
def test_one_byte_at_a_time_parses_the_same_commands(
        kind: FramerKind, stream_items: list[tuple[bytes, Command | None]]) -> None:
    stream = b"".join(wire for wire, _ in stream_items)[:3000]
    assert split_feed(kind(), stream, list(range(len(stream)))) == \
        split_feed(kind(), stream, [])


garbage = st.lists(st.one_of(
    st.sampled_from([b"*", b"$", b"\r\n", b"*2\r\n", b"$3\r\n", b"abc", b"$-1\r\n", b"+OK\r\n",
                     b"*1\r\n*1\r\n", b"$9999999999\r\n", b"*99999999\r\n", b"x" * 200,
                     b"*+2\r\n", b"$ 3\r\n", b"$1_0\r\n", b"*-1\r\n", b"$00\r\n", b"\n",
                     b"'", b"PING\r\n", b"GET k\r\n", b"$99999999999999999999\r\n"]),
    st.binary(max_size=20)), max_size=12).map(b"".join)
LIMITS = st.sampled_from([(50, 20, 300, 100), (8 * 1024 * 1024, 65536, 32 << 20, 65536),
                          (5, 3, 24, 6)])


def limited(kind: FramerKind, limits: tuple[int, int, int, int]) -> Framer[Command]:
    bulk, arguments, request, inline = limits
    return kind(max_bulk=bulk, max_arguments=arguments, max_request=request, max_inline=inline)


@kinds
@given(st.one_of(garbage, requests.map(lambda items: b"".join(w for w, _ in items))), cut_lists,
       LIMITS)
def test_any_split_gives_the_same_commands_or_error(
        kind: FramerKind, stream: bytes, cuts: list[int],
        limits: tuple[int, int, int, int]) -> None:
    """Arbitrary bytes, under tight limits too: the same commands, and a protocol error or not,
    wherever the stream is cut."""
    assert split_feed(limited(kind, limits), stream, cuts) == \
        split_feed(limited(kind, limits), stream, [])


def feed_events(framer: Framer[Command], stream: bytes,
                cuts: list[int]) -> list[tuple[object, ...]]:
    """Everything a caller sees, feed by feed: the commands (or the error's text) of each
    feed, what is buffered after it, and the end of the stream."""
    bounds = [0, *sorted(c % (len(stream) + 1) for c in cuts), len(stream)]
    events: list[tuple[object, ...]] = []
    for start, end in itertools.pairwise(bounds):
        try:
            events.append(("feed", framer.feed(stream[start:end]), framer.buffered,
                           str(framer.error) if framer.error else None))
        except ProtocolError as exc:
            events.append(("error", str(exc)))
            return events
    try:
        framer.eof()
    except ProtocolError as exc:
        events.append(("eof", str(exc)))
    return events


@needs_compiled_framer
@given(st.one_of(garbage, requests.map(lambda items: b"".join(w for w, _ in items))), cut_lists,
       LIMITS)
def test_compiled_and_reference_give_identical_events(
        stream: bytes, cuts: list[int], limits: tuple[int, int, int, int]) -> None:
    """The differential test: valid and invalid streams, cut anywhere, under any limits: both
    framers give the same commands, buffered sizes and error texts after every feed."""
    require(CompiledRespFramer is not None, "the compiled RESP framer (pip install -e .)")
    assert CompiledRespFramer is not None
    assert feed_events(limited(CompiledRespFramer, limits), stream, cuts) == \
        feed_events(limited(RespFramer, limits), stream, cuts)


keys = st.sampled_from([b"k", b"n", b"K", b"x"])
values = st.sampled_from([b"", b"v", b"0", b"-0", b"007", b"1", b"-1", b"+1", b"1 ", b"9" * 18,
                          b"-" + b"9" * 18, b"9" * 19, b"9223372036854775807",
                          b"-9223372036854775808", b"\r\n", b"x" * 300])
names = st.sampled_from([b"PING", b"ping", b"ECHO", b"GET", b"get", b"GeT", b"SET", b"set",
                         b"INCR", b"incr", b"DECR", b"MGET", b"DEL", b"EXPIRE", b"PERSIST",
                         b"GETS", b"PINGX", b"SETX", b"NOPE"])
# Commands near and in the fast path's plain forms: right and wrong arities, odd values,
# keys with a time to live (EXPIRE), commands it does not take.
server_commands = st.lists(st.one_of(
    st.tuples(names, keys).map(list),
    st.tuples(names, keys, values).map(list),
    st.tuples(names).map(list),
    st.tuples(st.just(b"EXPIRE"), keys, st.just(b"1000")).map(list),
    st.tuples(names, keys, values, values).map(list),
), max_size=40)


def run_command(handler: RespHandler, conn: Any, command: Command) -> bytes:
    """What ``RespHandler.message_received`` answers (outside MULTI), as bytes."""
    entry = handler.commands.get(command[0].upper())
    if entry is None:
        return b"-unknown\r\n"
    implementation, arity = entry
    if (arity > 0 and len(command) != arity) or len(command) < -arity:
        return b"-arity\r\n"
    reply = implementation(conn, command)
    assert reply is not None
    return reply


@needs_compiled_framer
@given(server_commands, st.booleans(), cut_lists, st.sampled_from([0, 10, 100, 1 << 20]),
       st.lists(st.booleans(), max_size=40), st.binary(max_size=8))
def test_serve_answers_as_the_python_commands_do(
        commands_: list[Command], resp3: bool, cuts: list[int], limit: int,
        use_rest: list[bool], tail: bytes) -> None:
    """The fast path's replies and store are the Python commands' own, for arrays and inline
    commands, any cuts, any reply limit, and any mix of resume and rest; a malformed tail gives
    the same error after the same replies."""
    require(StoreFramer is not None, "the RESP example's compiled fast path (pip install -e .)")
    assert StoreFramer is not None
    inline = iter(use_rest[::-1])
    stream = b"".join(
        b" ".join(c) + b"\r\n" if next(inline, False) and all(
            a and not any(ch in a for ch in b" \t\r\n\x0b\x0c\"'*") for a in c)
        else encode_command(c) for c in commands_) + tail
    bounds = [0, *sorted(c % (len(stream) + 1) for c in cuts), len(stream)]

    def conn() -> Any:
        return types.SimpleNamespace(user_data=Client(resp3=resp3), id=1)

    reference, reference_conn = RespHandler(), conn()
    pure = RespFramer()
    expected = b""
    for start, end in itertools.pairwise(bounds):
        try:
            for whole in pure.feed(stream[start:end]):
                expected += run_command(reference, reference_conn, whole)
        except ProtocolError:
            break
        if pure.error is not None:
            break

    served, served_conn = RespHandler(), conn()
    framer = StoreFramer(served.store, served.expires)
    framer.resp3 = resp3
    got = b""
    choices = iter(use_rest)
    for start, end in itertools.pairwise(bounds):
        piece = stream[start:end]
        try:
            replies, command = framer.serve(piece, limit)
        except ProtocolError:
            break
        while True:
            got += replies
            if command is not None:
                got += run_command(served, served_conn, command)
            if not framer.reading:
                break
            if next(choices, False):
                for whole in framer.rest(piece):
                    got += run_command(served, served_conn, whole)
                break
            replies, command = framer.resume(piece, limit)
        if framer.error is not None:
            break
    assert got == expected
    assert served.store == reference.store
    assert served.expires.keys() == reference.expires.keys()
    assert str(framer.error) == str(pure.error)


@needs_compiled_framer
@pytest.mark.parametrize("case", ["resp-arguments", "resp-bulk", "resp-inline"])
def test_compiled_framer_does_linear_work(case: str) -> None:
    """test_parse_work's bound, for the compiled twin: a trickled command costs about what it
    costs in one piece."""
    require(CompiledRespFramer is not None, "the compiled RESP framer (pip install -e .)")
    assert CompiledRespFramer is not None
    stream = parse_work.CASES[case][1]
    piece = 16 if case == "resp-inline" else parse_work.PIECE
    whole, whole_count = parse_work.parse_cpu(CompiledRespFramer, stream, len(stream))
    trickled, trickled_count = parse_work.parse_cpu(CompiledRespFramer, stream, piece)
    assert whole_count == trickled_count == 1
    assert trickled <= 5 * whole + 0.3, (case, whole, trickled)


class GeneralOnly(RespFramer):
    """The general parser alone, without the one-pass fast path for whole commands."""

    def _parse_whole(self, raw: bytes, messages: list[Command]) -> int:
        return 0


@given(st.one_of(garbage, requests.map(lambda items: b"".join(w for w, _ in items))), LIMITS)
def test_fast_path_and_general_parser_agree(stream: bytes,
                                            limits: tuple[int, int, int, int]) -> None:
    """The same commands and the same error, with or without the fast path (whole reads)."""
    bulk, arguments, request, inline = limits

    def run(framer: RespFramer) -> tuple[list[Command], str | None]:
        commands: list[Command] = []
        try:
            commands += framer.feed(stream)  # the commands before an error, error set
            framer.eof()  # raises that error, or one for a partial command
        except ProtocolError as exc:
            return commands, str(exc)
        return commands, None

    caps = {"max_bulk": bulk, "max_arguments": arguments, "max_request": request,
            "max_inline": inline}
    assert run(RespFramer(**caps)) == run(GeneralOnly(**caps))


@kinds
def test_inline_commands(kind: FramerKind) -> None:
    assert kind().feed(b"PING\r\nSET a  b\nGET a\r\n") == [
        [b"PING"], [b"SET", b"a", b"b"], [b"GET", b"a"]]


@kinds
@pytest.mark.parametrize(("bad", "error"), [
    (b"*1\r\n+PING\r\n", "expected '\\$', got '\\+'"),  # not a bulk string
    (b"*1\r\n*1\r\n$1\r\nx\r\n", "expected '\\$', got '\\*'"),  # nested: depth is 1
    (b"*1\r\n$-5\r\n", "invalid bulk length"),  # negative bulk length
    (b"*1\r\n$3\r\nabcXY", "not followed by CRLF"),  # missing CRLF after the bulk
    (b"*x\r\n", "invalid multibulk length"),  # not a number
    (b"*65537\r\n", "invalid multibulk length"),  # too many arguments
    (b"*1\r\n$8388609\r\n", "invalid bulk length"),  # bulk over 8 MiB
    (b"*1\r\n$" + b"1" * 40, "too big bulk count string"),  # a length line without end
    (b"*" + b"1" * 40, "too big mbulk count string"),
    (b"x" * 70_000, "too big inline request"),  # inline line without end, too long
])
def test_malformed_or_oversized_input_is_a_protocol_error(kind: FramerKind, bad: bytes,
                                                          error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        kind().feed(bad)


@kinds
def test_limits_are_configurable(kind: FramerKind) -> None:
    framer = kind(max_bulk=10, max_arguments=2, max_request=40, max_inline=8)
    assert framer.feed(encode_command([b"a" * 10, b"b"])) == [[b"a" * 10, b"b"]]
    for bad in (encode_command([b"a" * 11]), encode_command([b"a", b"b", b"c"]), b"123456789"):
        with pytest.raises(ProtocolError):
            kind(max_bulk=10, max_arguments=2, max_request=40, max_inline=8).feed(bad)
    # max_request counts the whole command, also when it arrives in pieces.
    stream = encode_command([b"a" * 10, b"b" * 10])  # 36 bytes: under 40
    assert split_feed(kind(max_request=40), stream, list(range(len(stream)))) == (
        [[b"a" * 10, b"b" * 10]], False)
    assert split_feed(kind(max_request=30), stream, list(range(len(stream))))[1]
    assert split_feed(kind(max_request=30), stream, [])[1]
    with pytest.raises(ValueError, match="max_inline"):
        kind(max_inline=0)


@kinds
def test_a_partial_command_is_buffered_and_counted(kind: FramerKind) -> None:
    framer = kind()
    assert framer.feed(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nab") == []
    assert framer.buffered > 0  # a message has begun: the read timeout runs
    assert framer.feed(b"cde\r\n") == [[b"SET", b"k", b"abcde"]]
    assert framer.buffered == 0
    framer.feed(b"*2\r\n$1\r\na\r\n")
    with pytest.raises(ProtocolError, match="inside"):
        framer.eof()


def test_reply_encoding() -> None:
    assert encode_array([b"a", None]) == b"*2\r\n$1\r\na\r\n$-1\r\n"


def _tool(name: str) -> str:
    return require_tool(name)  # scripts/test installs Debian's redis-tools


class PureFramerResp(RespHandler):
    """The RESP example on the reference framer (so without the compiled fast path)."""

    def make_framer(self) -> Framer[Command]:
        return RespFramer()


# How each end-to-end test runs the server: on every engine, and once on the reference framer.
SERVERS = {
    "compiled": ["resp", "--port", "0", "--engine", "compiled"],
    "epoll": ["resp", "--port", "0", "--engine", "epoll"],
    "asyncio": ["resp", "--port", "0", "--engine", "asyncio"],
    "uvloop": ["resp", "--port", "0", "--engine", "uvloop"],
    "compiled-pure-framer": ["serve", "test_resp:PureFramerResp", "--listen", "127.0.0.1:0",
                             "--app-dir", os.path.dirname(__file__), "--engine", "compiled"],
}


@pytest.fixture(params=list(SERVERS))
def resp_port(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> Iterator[int]:
    if request.param == "uvloop":
        require(HAVE_UVLOOP, "uvloop (the uvloop engine)")
    proc = PortsideProcess([*SERVERS[request.param], "--control", os.path.join(tmp_path, "ctl")])
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


def exchange(port: int, request: bytes, last: bytes) -> bytes:
    """Send ``request`` in one write; read until what arrived ends with ``last``."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(request)
        got = b""
        while not got.endswith(last):
            data = sock.recv(65536)
            assert data, got
            got += data
        return got


def test_one_read_mixing_fast_and_other_commands_keeps_every_contract(resp_port: int) -> None:
    """A pipelined read whose plain commands the fast path answers, around commands it hands
    back: MULTI queues what follows (a plain SET too), HELLO 3 changes the null a later GET
    gets, a key with a time to live is read the careful way; all replies in order."""
    request = b"".join(encode_command(c) for c in [
        [b"SET", b"k", b"1"], [b"MULTI"], [b"SET", b"k", b"2"], [b"INCR", b"k"], [b"EXEC"],
        [b"GET", b"k"], [b"GET", b"none"], [b"HELLO", b"3"], [b"GET", b"none"],
        [b"SET", b"t", b"v"], [b"EXPIRE", b"t", b"100"], [b"GET", b"t"], [b"INCR", b"t"],
        [b"DECR", b"k"], [b"ping"], [b"MGET", b"k", b"t"], [b"ECHO", b"e"],
    ]) + b"PING\r\n"
    hello = (b"%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$5\r\n7.0.0\r\n"
             b"$5\r\nproto\r\n:3\r\n$2\r\nid\r\n")
    before = (b"+OK\r\n+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n+OK\r\n:3\r\n$1\r\n3\r\n$-1\r\n")
    after = (b"_\r\n+OK\r\n:1\r\n$1\r\nv\r\n-ERR value is not an integer or out of range\r\n"
             b":2\r\n+PONG\r\n*2\r\n$1\r\n2\r\n$1\r\nv\r\n$1\r\ne\r\n+PONG\r\n")
    got = exchange(resp_port, request, after)
    assert got.startswith(before + hello)  # the rest of HELLO's map holds the connection's id
    assert got.endswith(b"$7\r\nmodules\r\n*0\r\n" + after)


@pytest.mark.parametrize("server", ["compiled", "compiled-pure-framer"])
def test_a_command_left_unfinished_hits_the_read_timeout(tmp_path: os.PathLike[str],
                                                         server: str) -> None:
    """The fast path reports what the peer owes as the message layer does: a command cut
    short is closed after read_timeout (not before), one that sent whole commands is not."""
    proc = PortsideProcess([*SERVERS[server], "--read-timeout", "0.8",
                            "--control", os.path.join(tmp_path, "ctl")])
    try:
        port = int(proc.wait_for(r"listening on [\d.]+:(\d+)").group(1))
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as whole, \
                socket.create_connection(("127.0.0.1", port), timeout=WAIT) as cut:
            whole.sendall(encode_command([b"SET", b"k", b"v"]) + b"GET k\r\n")
            assert exchange_on(whole, b"$1\r\nv\r\n") == b"+OK\r\n$1\r\nv\r\n"
            cut.sendall(encode_command([b"PING"]) + b"*2\r\n$3\r\nGET\r\n$1\r\n")
            started = time.monotonic()
            assert exchange_on(cut, b"+PONG\r\n") == b"+PONG\r\n"
            assert cut.recv(100) == b""  # closed by the server
            waited = time.monotonic() - started
            assert_on_time(waited, 0.8)
            whole.sendall(b"PING\r\n")  # owed nothing: still open
            assert exchange_on(whole, b"+PONG\r\n") == b"+PONG\r\n"
    finally:
        proc.kill()


def exchange_on(sock: socket.socket, last: bytes) -> bytes:
    """Read from ``sock`` until what arrived ends with ``last``."""
    got = b""
    while not got.endswith(last):
        data = sock.recv(65536)
        assert data, got
        got += data
    return got


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("server", list(SERVERS))
def test_pipelined_large_gets_keep_the_server_small(tmp_path: os.PathLike[str],
                                                    server: str) -> None:
    """200 GETs of a 1 MiB value in one read, from a client that reads slowly: the server
    holds about high water plus one reply at a time (its peak RSS grows by far less than the
    200 MiB the replies add up to), and every reply arrives intact."""
    proc = PortsideProcess([*SERVERS[server], "--control", os.path.join(tmp_path, "ctl")])
    try:
        port = int(proc.wait_for(r"listening on [\d.]+:(\d+)").group(1))
        value = bytes(range(256)) * 4096  # 1 MiB
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
            sock.sendall(encode_command([b"SET", b"big", value]))
            assert sock.recv(5) == b"+OK\r\n"
            before = peak_rss(proc.proc.pid)
            sock.sendall(encode_command([b"GET", b"big"]) * 200)  # ~4.6 KB: one read
            reply = b"$%d\r\n%s\r\n" % (len(value), value)
            for _ in range(200):
                got = bytearray()
                while len(got) < len(reply):
                    chunk = sock.recv(min(256 * 1024, len(reply) - len(got)))
                    assert chunk, "EOF"
                    got += chunk
                assert got == reply
            grown = peak_rss(proc.proc.pid) - before
        assert grown < 48 * 1024 * 1024, grown
    finally:
        proc.kill()
