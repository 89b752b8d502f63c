"""The engines themselves: the compiled one is built and chosen by default, and is the same
connection class as the reference in everything a handler can reach."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import weakref
from collections.abc import Callable
from typing import Any

import pytest
from conftest import WAIT, Clients, ServeFactory, recv_exactly, recv_until_eof, require
from hypothesis import given
from hypothesis import strategies as st

import portside
from portside import Engine, ListenerConfig, ServerConfig
from portside.engine import compiled
from portside.engine.connection import Connection
from portside.engine.core import EngineCore
from portside.engine.deadlines import DeadlineQueue
from portside.engine.epoll import EpollReactor
from portside.engine.listener import Listener
from portside.errors import ServerStateError
from portside.protocols.proxy import Version as ProxyVersion
from portside.server import resolve_engine


def test_the_compiled_engine_is_built() -> None:
    # CI fails here, rather than quietly testing only the pure-Python engine.
    assert compiled.available(), \
        f"the compiled engine did not build: {compiled.reason_unavailable()}"
    assert resolve_engine(Engine.AUTO) is Engine.COMPILED
    assert resolve_engine(ServerConfig().engine) is Engine.COMPILED


def test_the_stub_says_what_the_extension_is() -> None:
    """``_compiled.pyi`` names each class's real bases and only methods it has (a stub that
    made the compiled bases subclasses of the reference classes hid what compiled.py adds)."""
    import ast
    from pathlib import Path

    from portside.engine import _compiled

    stub = ast.parse(Path(_compiled.__file__).with_name("_compiled.pyi").read_text())
    for node in stub.body:
        if not isinstance(node, ast.ClassDef):
            continue
        runtime = getattr(_compiled, node.name)
        assert [ast.unparse(base) for base in node.bases] == [
            base.__name__ for base in runtime.__bases__ if base is not object], node.name
        for item in node.body:
            if isinstance(item, ast.FunctionDef):
                assert hasattr(runtime, item.name), f"{node.name}.{item.name}"


@pytest.mark.parametrize(("reference", "twin_name"), [
    (Connection, "CompiledConnection"), (Listener, "CompiledListener"),
    (EngineCore, "CompiledCore")])
def test_compiled_classes_offer_everything_the_reference_does(
        reference: type, twin_name: str) -> None:
    twin = getattr(compiled, twin_name)
    missing = {name for klass in reference.__mro__[:-1] for name in vars(klass)
               if not name.startswith("__") and not hasattr(twin, name)}
    assert not missing, f"{twin_name} lacks {sorted(missing)}"


def test_compiled_connections_hold_no_dict() -> None:
    conn = compiled.CompiledConnection()
    assert not hasattr(conn, "__dict__")  # an idle connection costs its fields, nothing more


def test_fallback_is_said_in_one_line() -> None:
    """Where the extension cannot be imported, ``auto`` runs the pure engine and says so."""
    script = (
        "import sys, logging\n"
        "sys.modules['portside.engine._compiled'] = None  # as if it were not built\n"
        "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        "from portside import Engine\n"
        "from portside.server import resolve_engine\n"
        "print(resolve_engine(Engine.AUTO).value)\n"
        "print(resolve_engine(Engine.AUTO).value)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=WAIT, check=True)
    assert run.stdout.split() == ["epoll", "epoll"]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "pure-Python epoll engine" in lines[0], run.stderr
    forced = subprocess.run(
        [sys.executable, "-c", script.replace("Engine.AUTO", "Engine.COMPILED", 1)],
        capture_output=True, text=True, timeout=WAIT)
    assert forced.returncode != 0 and "compiled engine is not available" in forced.stderr


def test_a_lent_buffer_kept_by_a_handler_is_never_reused(serve: ServeFactory,
                                                         clients: Clients) -> None:
    """A handler that keeps a slice of what it was lent sees its own bytes forever."""
    from portside import Handler

    kept: list[memoryview] = []

    class Keeper(Handler):
        def data_received(self, conn: portside.Connection, data: memoryview) -> None:
            kept.append(data[:4])  # a slice outlives the callback
            conn.write(b"ok")

    rs = serve(ListenerConfig(), handler=Keeper())
    first = clients.connect(rs.address())
    first.sendall(b"AAAA")
    assert recv_exactly(first, 2) == b"ok"
    second = clients.connect(rs.address())
    second.sendall(b"BBBB")
    assert recv_exactly(second, 2) == b"ok"
    assert [bytes(view) for view in kept] == [b"AAAA", b"BBBB"]
    # The first buffer was dropped from the pool (the second may still be on its way out).
    assert rs.server.statistics().buffer_pool.discarded >= 1
    kept.clear()


def test_each_read_is_lent_at_its_own_length(serve: ServeFactory, clients: Clients) -> None:
    """The view lent for a read (reused from read to read where nobody kept it) shows exactly
    that read's bytes, long reads and short ones alike; a view kept whole is released."""
    from portside import Handler

    seen: list[tuple[int, int, bytes]] = []
    kept: list[memoryview] = []

    class Recorder(Handler):
        def data_received(self, conn: portside.Connection, data: memoryview) -> None:
            seen.append((len(data), data.nbytes, data.tobytes()))
            if bytes(data[:4]) == b"KEEP":
                kept.append(data)
            conn.write(b"%d;" % len(data))

    rs = serve(ListenerConfig(), handler=Recorder())
    sock = clients.connect(rs.address())
    chunks = [b"x" * 3000, b"ab", b"KEEP-this", b"y" * 700, b"z"]
    for chunk in chunks:
        sock.sendall(chunk)  # one read each: the next is sent once this one is answered
        answer = b"%d;" % len(chunk)
        assert recv_exactly(sock, len(answer)) == answer
    assert seen == [(len(chunk), len(chunk), chunk) for chunk in chunks]
    with pytest.raises(ValueError):
        bytes(kept[0])  # released when its callback returned: never another read's bytes
    kept.clear()


def test_a_connection_pending_on_its_proxy_header_is_drained_at_shutdown(
        serve: ServeFactory, clients: Clients) -> None:
    """Immediate listener behind a balancer: the connection was accepted when it connected, so
    a shutdown that starts before its PROXY header arrives still serves it."""
    rs = serve(ListenerConfig(proxy_protocol=ProxyVersion.V1, first_data_timeout=30,
                              trusted_proxies=("127.0.0.1",)))
    sock = clients.connect(rs.address())  # accepted now, or from the backlog at shutdown
    rs.server.shutdown(drain_timeout=WAIT)
    rs.handler.wait(lambda: "shutdown_started" in rs.handler.names(), "shutdown_started")
    with pytest.raises(ConnectionRefusedError):
        clients.connect(rs.address())
    sock.sendall(b"PROXY TCP4 192.0.2.1 127.0.0.1 1234 80\r\nhello")
    assert recv_exactly(sock, 5) == b"hello"
    sock.shutdown(socket.SHUT_WR)
    assert recv_until_eof(sock) == b""
    rs.thread.join(WAIT)
    assert not rs.thread.is_alive()


@given(st.lists(st.tuples(st.sampled_from(["add", "discard", "expire", "older"]),
                          st.integers(0, 9), st.floats(0, 100, allow_nan=False)),
                max_size=60))
def test_compiled_deadline_queue_behaves_as_the_reference(
        steps: list[tuple[str, int, float]]) -> None:
    """The compiled engine's DeadlineQueue is the same structure as deadlines.py's."""
    from portside.engine._compiled import DeadlineQueue as Twin

    reference, twin = DeadlineQueue[int](5.0), Twin(5.0)
    now = 0.0
    for action, item, step in steps:
        now += step / 10
        if action == "add":
            reference.add(item, now)
            twin.add(item, now)
        elif action == "discard":
            reference.discard(item)
            twin.discard(item)
        elif action == "expire":
            assert twin.pop_expired(now) == reference.pop_expired(now)
        else:
            assert twin.pop_older_than(step / 20, now) == reference.pop_older_than(step / 20, now)
        assert len(twin) == len(reference)
        assert twin.next_due() == reference.next_due()
        assert (item in twin) == (item in reference)


def _eventfds() -> set[int]:
    """This process's eventfd descriptors now."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[eventfd]":
                found.add(int(name))
    return found


@pytest.mark.parametrize("kind", ["epoll", "compiled"])
def test_a_wake_up_after_close_reaches_no_descriptor(kind: str) -> None:
    """Issue 19: a wake-up from another thread while (or after) the loop closes wrote to its
    closed eventfd (EBADF), or, once the kernel had given the number to another file, into
    that file. After close() it is a no-op; closing twice is one too."""
    if kind == "compiled":
        require(compiled.available(), "the compiled engine")
    before = _eventfds()
    reactor = compiled.Loop() if kind == "compiled" else EpollReactor()
    (wake_fd,) = _eventfds() - before
    reactor.close()
    reactor.close()
    reused: list[int] = []
    try:
        while not reused or reused[-1] < wake_fd:  # the lowest free numbers come first
            reused.append(os.eventfd(0, os.EFD_NONBLOCK))
        assert reused[-1] == wake_fd
        reactor.call_soon_threadsafe(lambda: None)  # no EBADF, and...
        with pytest.raises(BlockingIOError):
            os.eventfd_read(wake_fd)  # ...nothing written into the file now on that number
    finally:
        for fd in reused:
            os.close(fd)


def test_a_stopped_servers_loop_is_not_reached(serve: ServeFactory) -> None:
    """After the server stopped, ``call_soon_threadsafe`` says so (ServerStateError) instead of
    writing to its loop's closed wake-up descriptor; ``shutdown()`` again does nothing."""
    rs = serve()
    rs.stop()
    with pytest.raises(ServerStateError):
        rs.server.call_soon_threadsafe(lambda: None)
    rs.server.shutdown()


class _Lender(portside.Handler):
    """Answers each read with ``ok``, after ``look(data)`` (run inside the callback)."""

    def __init__(self, look: Callable[[memoryview], None]) -> None:
        self.look = look

    def data_received(self, conn: portside.Connection, data: memoryview) -> None:
        self.look(data)
        conn.write(b"ok")


def _two_reads(serve: ServeFactory, clients: Clients, handler: portside.Handler,
               first: bytes, second: bytes) -> None:
    """One read from each of two connections, one after the other."""
    rs = serve(ListenerConfig(), handler=handler)
    for payload in (first, second):
        sock = clients.connect(rs.address())
        sock.sendall(payload)
        assert recv_exactly(sock, 2) == b"ok"


def test_a_weak_reference_to_a_lent_view_never_shows_another_read(
        serve: ServeFactory, clients: Clients) -> None:
    """Issue 21, item 3: the compiled engine lent the same view object again when no strong
    reference was left; a weak one kept past the callback then showed the next connection's
    bytes. Now such a view is released, like one kept strongly."""
    kept: list[weakref.ref[memoryview]] = []
    _two_reads(serve, clients, _Lender(lambda data: kept.append(weakref.ref(data))),
               b"first peer's secret", b"the second peer")
    for ref in kept[:1]:
        view = ref()
        if view is not None:
            with pytest.raises(ValueError, match="released"):
                bytes(view)
    kept.clear()


def test_a_lent_views_obj_shows_only_this_read(serve: ServeFactory, clients: Clients) -> None:
    """``data.obj`` was the whole pooled buffer, an earlier (longer) read's bytes included.
    Now it exports this read's bytes only (compiled), or them followed by zeros (a
    ``bytearray`` on the pure engines: see buffers.py)."""
    seen: list[tuple[bytes, bytes]] = []
    _two_reads(serve, clients, _Lender(lambda data: seen.append((bytes(data), bytes(data.obj)))),
               b"A" * 3000, b"bb")
    for data, whole in seen:
        assert whole[:len(data)] == data
        assert whole[len(data):] == bytes(len(whole) - len(data)), whole[len(data):][:40]


def test_a_kept_obj_never_shows_another_read(serve: ServeFactory, clients: Clients) -> None:
    """A handler that keeps ``data.obj`` keeps that buffer: the pool never lends it again, so
    it goes on showing the read it came with, never a later connection's."""
    kept: list[Any] = []

    def keep(data: memoryview) -> None:
        if not kept:
            kept.append(data.obj)

    _two_reads(serve, clients, _Lender(keep), b"first peer's secret", b"the second peer")
    whole = bytes(kept[0])
    assert whole.startswith(b"first peer's secret")
    assert b"second" not in whole
    kept.clear()
