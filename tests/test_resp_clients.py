"""``portside resp`` against the Python client people use first, redis-py, with its defaults:
every scenario runs against portside and against a real ``redis-server`` started here, and the
results must be the same (issue 13). Also the expiry heap, without sockets."""

from __future__ import annotations

import asyncio
import os
import queue
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
from conftest import HAVE_UVLOOP, assert_on_time, require, require_tool
from proc import PortsideProcess

from portside.examples.resp import EXPIRE_BATCH, RespHandler

WAIT = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def redis_port() -> Iterator[int]:
    """A real redis-server on a free loopback port, without persistence; killed by its PID."""
    path = require_tool("redis-server")  # scripts/test installs Debian's redis-server
    port = free_port()
    proc = subprocess.Popen(
        [path, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--daemonize", "no", "--loglevel", "notice"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + WAIT
        while True:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            assert line is not None, "redis-server exited before it was ready"
            if "Ready to accept connections" in line:
                break
        yield port
    finally:
        proc.kill()
        proc.wait(WAIT)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture(scope="module", params=["compiled", "epoll", "asyncio", "uvloop"])
def portside_port(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                  ) -> Iterator[int]:
    if request.param == "uvloop":
        require(HAVE_UVLOOP, "uvloop (the uvloop engine)")
    control = tmp_path_factory.mktemp("ctl") / "ctl"
    proc = PortsideProcess(["resp", "--port", "0", "--engine", request.param,
                            "--control", str(control)])
    try:
        yield int(proc.wait_for(r"listening on [\d.]+:(\d+)").group(1))
    finally:
        proc.kill()


def command(client: Any, *args: Any) -> Any:
    return client.execute_command(*args)


def outcome(call: Callable[[], Any]) -> Any:
    """What a call returned, or the error it raised as (type name, message)."""
    try:
        return call()
    except redis.RedisError as exc:
        return (type(exc).__name__, str(exc))


def scenario(port: int) -> list[Any]:
    """What redis-py with its default settings sees for ordinary use of the commands."""
    client = redis.Redis(port=port, socket_timeout=WAIT)  # RESP3 via HELLO 3, CLIENT SETINFO
    try:
        client.flushall()
        value = os.urandom(1_000_000)  # 1 MB
        results: list[Any] = [
            client.ping(), client.echo(b"a\r\nb"),
            client.set("greeting", "hello"), client.get("greeting"), client.get("missing"),
            client.set("big", value), client.get("big") == value,
            client.incr("n"), client.incr("n", 41), client.decr("n"), client.decrby("n", 2),
            outcome(lambda: client.incr("greeting")),
            client.exists("greeting", "greeting", "missing"), client.exists("missing"),
            client.mset({"a": "1", "b": "2", "c": "3"}), client.mget("a", "missing", "c"),
            client.delete("a", "missing"), client.mget(["a", "b"]),
            client.set("nx", "1", nx=True), client.set("nx", "2", nx=True), client.get("nx"),
            client.set("xx", "1", xx=True), client.set("nx", "3", get=True),
            client.getdel("nx"), client.get("nx"),
            client.ttl("greeting"), client.ttl("missing"),
            client.set("later", "v", ex=100), client.ttl("later"),
            client.expire("greeting", 50), client.ttl("greeting"),
            client.expire("greeting", 10, gt=True), client.expire("greeting", 10, lt=True),
            client.ttl("greeting"), client.persist("greeting"), client.ttl("greeting"),
            client.expire("missing", 10), client.pexpire("b", -1), client.exists("b"),
            outcome(lambda: client.set("bad", "v", ex=0)),
            outcome(lambda: command(client, "FROB", "x", "y")),
            outcome(lambda: command(client, "GET")),
            outcome(lambda: command(client, "SET", "k", "v", "NX", "XX")),
            outcome(lambda: command(client, "HELLO", "4")),
            outcome(lambda: command(client, "INCRBY", "n", "1.5")),
            outcome(lambda: command(client, "EXPIRE", "n", "5", "SOON")),
            client.client_setname("tester"), client.client_getname(),
        ]
        # A pipeline of 1,000 commands, as redis-py sends it by default (MULTI/EXEC) and not.
        for transaction in (True, False):
            pipe = client.pipeline(transaction=transaction)
            for i in range(1000):
                (pipe.incr("counter") if i % 2 else pipe.set(f"key:{i}", i))
            replies = pipe.execute()
            results += [len(replies), replies[:4], replies[-2:]]
        results.append(client.get("counter"))
        # The same with RESP2.
        old = redis.Redis(port=port, protocol=2, socket_timeout=WAIT)
        try:
            results += [old.get("missing"), old.mget("missing", "counter"), old.incr("n")]
        finally:
            old.close()
        return results
    finally:
        client.close()


async def async_scenario(port: int) -> list[Any]:
    client = redis.asyncio.Redis(port=port, socket_timeout=WAIT)
    try:
        await client.flushall()
        await client.set("async", "yes")
        results: list[Any] = [await client.ping(), await client.get("async"),
                              await client.incr("an")]
        # Concurrent commands over the client's pool: each value once, in whatever order.
        results.append(sorted(await asyncio.gather(*(client.incr("an") for _ in range(50)))))
        async with client.pipeline() as pipe:
            for i in range(100):
                pipe.set(f"ak{i}", i)
            results.append(len(await pipe.execute()))
        results.append(await client.mget("ak0", "ak99", "nothing"))
        return results
    finally:
        await client.aclose()


def test_redis_py_default_client(portside_port: int, redis_port: int) -> None:
    ours = scenario(portside_port)
    assert ours == scenario(redis_port)
    assert ours[:5] == [True, b"a\r\nb", True, b"hello", None]


def test_redis_py_asyncio_client(portside_port: int, redis_port: int) -> None:
    ours = asyncio.run(async_scenario(portside_port))
    assert ours == asyncio.run(async_scenario(redis_port))
    assert ours[0] is True and ours[1] == b"yes"


def raw(port: int, request: bytes, reply_size: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(request)
        got = b""
        while len(got) < reply_size:
            chunk = sock.recv(65536)
            assert chunk, got
            got += chunk
        return got


def test_resp3_and_resp2_replies_match_redis(portside_port: int, redis_port: int) -> None:
    """Null is ``_`` after HELLO 3 and ``$-1`` after HELLO 2; HELLO 4 is -NOPROTO."""
    for port in (portside_port, redis_port):
        hello3 = raw(port, b"HELLO 3\r\n", 1)
        assert hello3.startswith(b"%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n")
        request = b"HELLO 3\r\nGET nothing\r\nMGET nothing\r\nHELLO 2\r\nGET nothing\r\nHELLO 4\r\n"
        tail = b"_\r\n*1\r\n_\r\n"
        replies = raw(port, request + b"PING\r\n", len(hello3) + 200)
        assert tail in replies and b"$-1\r\n-NOPROTO unsupported protocol version\r\n" in replies
        assert replies.endswith(b"+PONG\r\n")


def poll_until(check: Callable[[], bool], limit: float) -> float:
    """Seconds until ``check()`` holds, asking every 10 ms for at most ``limit`` seconds."""
    started = time.monotonic()
    for _ in range(int(limit / 0.01) + 1):
        if check():
            return time.monotonic() - started
        time.sleep(0.01)  # the clock is the event here: expiry has no other signal
    raise AssertionError(f"not within {limit} s")


@pytest.mark.parametrize("server", ["portside", "redis"])
def test_expiry_neither_early_nor_late(portside_port: int, redis_port: int,
                                       server: str) -> None:
    client = redis.Redis(port=portside_port if server == "portside" else redis_port,
                         socket_timeout=WAIT)
    try:
        before = time.monotonic()
        assert client.set("soon", "v", px=800)
        assert client.get("soon") == b"v"
        assert 0 < client.pttl("soon") <= 800
        poll_until(lambda: not client.exists("soon"), WAIT)
        # From before the SET (the deadline counts from when it arrived): not early, not late.
        assert_on_time(time.monotonic() - before, 0.8)
        assert client.get("soon") is None and client.ttl("soon") == -2
    finally:
        client.close()


def test_expired_keys_are_reclaimed_in_deadline_order_without_a_scan() -> None:
    handler = RespHandler()
    now = 1_000_000
    for i in range(3 * EXPIRE_BATCH):
        handler.store[b"k%d" % i] = b"v"
        handler.set_deadline(b"k%d" % i, now + i)
    handler.store[b"forever"] = b"v"
    handler.set_deadline(b"k0", now + 10 * EXPIRE_BATCH)  # moved: its old entry is stale
    assert handler.reclaim_expired(now + EXPIRE_BATCH // 2) == EXPIRE_BATCH // 2
    assert b"k0" in handler.store and b"k1" not in handler.store
    assert b"k%d" % (EXPIRE_BATCH // 2 + 1) in handler.store
    # At most EXPIRE_BATCH per call, the earliest first; later calls take the rest.
    assert handler.reclaim_expired(now + 5 * EXPIRE_BATCH) == EXPIRE_BATCH
    assert handler.reclaim_expired(now + 5 * EXPIRE_BATCH) == EXPIRE_BATCH
    assert handler.reclaim_expired(now + 5 * EXPIRE_BATCH) == EXPIRE_BATCH // 2 - 1
    assert sorted(handler.store) == [b"forever", b"k0"]
    # Deadlines reset again and again do not grow the heap without bound.
    for i in range(10_000):
        handler.set_deadline(b"k0", now + i)
    assert len(handler._deadlines) <= 2 * len(handler.expires) + 1024


def test_guide_snippet_works_as_written(portside_port: int) -> None:
    """The guide's redis-py snippet, run as it stands (only its port is this server's)."""
    readme = (Path(__file__).parent.parent / "docs" / "guide.md").read_text()
    section = readme[readme.index("### The RESP example"):]
    start = section.index("```python\n") + len("```python\n")
    snippet = section[start:section.index("\n```", start)]
    assert "port=6380" in snippet
    redis.Redis(port=portside_port).flushall()
    code = snippet.replace("port=6380", f"port={portside_port}")
    exec(compile(code, "docs/guide.md", "exec"), {})
