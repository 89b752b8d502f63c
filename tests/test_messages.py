"""Messages and ordered offload: replies leave in request order whatever order work finishes in;
too many requests in flight pause reading; a failing job closes only its connection."""

from __future__ import annotations

import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from conftest import WAIT, Clients, ServeFactory, recv_exactly, recv_until_eof
from hypothesis import given
from hypothesis import strategies as st

from portside import CloseReason, Connection, ListenerConfig, Server
from portside.connection import as_layer
from portside.messages import MessageHandler
from portside.ordering import Outcome, ReplySequencer
from portside.protocols.framing import LengthPrefixFramer, Message


@given(st.permutations(list(range(30))))
def test_sequencer_releases_in_issue_order(finish_order: list[int]) -> None:
    sequencer = ReplySequencer()
    issued = [sequencer.issue() for _ in range(30)]
    released: list[Any] = []
    for seq in finish_order:
        released += [outcome.value for outcome in sequencer.complete(issued[seq], Outcome(seq))]
        assert len(released) <= sequencer.next_release
    assert released == list(range(30))
    assert sequencer.outstanding == 0


def test_sequencer_rejects_unknown_or_repeated_numbers() -> None:
    sequencer = ReplySequencer()
    first = sequencer.issue()
    sequencer.issue()
    with pytest.raises(ValueError):
        sequencer.complete(5, Outcome())
    sequencer.complete(first + 1, Outcome())
    with pytest.raises(ValueError):
        sequencer.complete(first + 1, Outcome())


class Worker(MessageHandler[Message]):
    """Length-prefixed requests; b"fail..." raises in the pool, b"now..." is answered on the
    loop, anything else sleeps a random few milliseconds in the pool and comes back upper-cased."""

    max_outstanding = 8

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(8)
        self.errors: list[BaseException] = []
        self.closed: list[CloseReason] = []
        self.gate = threading.Event()
        self.gate.set()
        self.peak_outstanding = 0
        self.paused_seen = threading.Event()
        self.lock = threading.Lock()

    def make_framer(self) -> LengthPrefixFramer:
        return LengthPrefixFramer(4)

    def message_received(self, conn: Connection, message: Message) -> None:
        request = bytes(message)
        if request.startswith(b"now"):
            self.reply(conn, request.upper())
        else:
            self.offload(conn, self.work, request)
        outstanding = as_layer(conn).layer.sequencer.outstanding
        self.peak_outstanding = max(self.peak_outstanding, outstanding)

    def data_received(self, conn: Connection, data: memoryview) -> None:
        super().data_received(conn, data)
        if conn.reading_paused:
            self.paused_seen.set()

    def work(self, request: bytes) -> bytes:
        self.gate.wait(WAIT)
        time.sleep(random.random() / 200)
        if request.startswith(b"fail"):
            raise RuntimeError("the job failed")
        return request.upper()

    def offload_failed(self, conn: Connection, exc: BaseException) -> None:
        with self.lock:
            self.errors.append(exc)
        conn.close()

    def connection_closed(self, conn: Connection, reason: CloseReason) -> None:
        with self.lock:
            self.closed.append(reason)

    def server_stopped(self, server: Server) -> None:
        assert self.executor is not None
        self.executor.shutdown()


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


def unframe(stream: bytes) -> list[bytes]:
    framer = LengthPrefixFramer(4)
    messages = [bytes(m) for m in framer.feed(stream)]
    framer.eof()
    return messages


def run_server(serve: ServeFactory, handler: Worker) -> Any:
    return serve(ListenerConfig(), handler=handler)


def test_replies_in_request_order_under_random_completion(
        serve: ServeFactory, clients: Clients) -> None:
    handler = Worker()
    rs = run_server(serve, handler)
    requests = [f"job {i}".encode() if i % 3 else f"now {i}".encode() for i in range(200)]
    socks = [clients.connect(rs.address()) for _ in range(4)]
    for sock in socks:
        sock.sendall(b"".join(frame(r) for r in requests))
        sock.shutdown(socket.SHUT_WR)
    for sock in socks:
        assert unframe(recv_until_eof(sock)) == [r.upper() for r in requests]


def test_outstanding_limit_pauses_then_resumes_reading(
        serve: ServeFactory, clients: Clients) -> None:
    handler = Worker()
    handler.gate.clear()  # hold every job: requests pile up to the limit
    rs = run_server(serve, handler)
    sock = clients.connect(rs.address())
    requests = [f"job {i}".encode() for i in range(100)]
    sock.sendall(b"".join(frame(r) for r in requests))
    assert handler.paused_seen.wait(WAIT)
    assert handler.peak_outstanding == handler.max_outstanding
    handler.gate.set()
    sock.shutdown(socket.SHUT_WR)
    assert unframe(recv_until_eof(sock)) == [r.upper() for r in requests]


def test_failed_job_closes_only_its_connection(serve: ServeFactory, clients: Clients) -> None:
    handler = Worker()
    rs = run_server(serve, handler)
    bad, good = clients.connect(rs.address()), clients.connect(rs.address())
    bad.sendall(frame(b"job a") + frame(b"fail b") + frame(b"job c"))
    assert unframe(recv_until_eof(bad)) == [b"JOB A"]  # replies before the failure, then EOF
    good.sendall(frame(b"job d") + frame(b"now e"))
    good.shutdown(socket.SHUT_WR)
    assert unframe(recv_until_eof(good)) == [b"JOB D", b"NOW E"]
    assert len(handler.errors) == 1 and "the job failed" in str(handler.errors[0])


def test_malformed_frame_closes_the_connection(serve: ServeFactory, clients: Clients) -> None:
    handler = Worker()
    rs = run_server(serve, handler)
    sock = clients.connect(rs.address())
    sock.sendall(frame(b"now ok") + b"\xff\xff\xff\xff" + b"x" * 10)  # 4 GiB: over the limit
    assert unframe(recv_until_eof(sock)) == [b"NOW OK"]
    rs.server.shutdown()
    rs.thread.join(WAIT)
    assert CloseReason.PROTOCOL_ERROR in handler.closed


REPLY_SIZE = 1024 * 1024


class BigReplies(MessageHandler[Message]):
    """Each request line is answered with REPLY_SIZE bytes (like GET of a 1 MiB value); records
    the most output the connection ever held: its write queue plus corked replies."""

    def __init__(self) -> None:
        self.value = bytes(range(256)) * (REPLY_SIZE // 256)
        self.peak = 0
        self.answered = 0
        self.held_seen = threading.Event()
        self.errors: list[BaseException] = []

    def message_received(self, conn: Connection, message: Message) -> None:
        self.answered += 1  # before the reply: the client may have it before this line runs
        self.reply(conn, len(self.value).to_bytes(4, "big") + bytes(message) + b"|" + self.value)
        held = sum(len(m) for m in as_layer(conn).layer.sequencer.held)
        room = as_layer(conn).layer.sequencer.cork_room
        corked = 0 if room is None else conn.listener.config.write_high_water - room
        self.peak = max(self.peak, conn.write_buffer_size + corked + held)

    def encode_reply(self, conn: Connection, reply: bytes) -> list[bytes]:
        return [reply]

    def data_received(self, conn: Connection, data: memoryview) -> None:
        super().data_received(conn, data)
        if as_layer(conn).layer.sequencer.held:
            self.held_seen.set()

    def error(self, conn: Connection | None, exc: BaseException) -> None:
        self.errors.append(exc)


def test_pipelined_large_replies_stay_bounded(serve: ServeFactory, clients: Clients) -> None:
    """200 requests in one read whose replies are 1 MiB each: the server stops taking requests
    while its write queue is over high water, so it never holds more than about high water
    plus one reply (not 200 MiB); the slow client still gets every reply intact, in order."""
    handler = BigReplies()
    high_water = 64 * 1024
    rs = serve(ListenerConfig(write_high_water=high_water, write_low_water=16 * 1024),
               handler=handler)
    sock = clients.connect(rs.address())
    requests = [b"get %03d" % i for i in range(200)]
    sock.sendall(b"".join(r + b"\n" for r in requests))  # ~1.6 KB: one read
    assert handler.held_seen.wait(WAIT)  # the server stopped taking requests; we read nothing
    answered_while_stalled = handler.answered
    assert answered_while_stalled < 50  # the kernel's socket buffers hold a few, no more
    for request in requests:  # read slowly: one reply at a time, in small pieces
        head = recv_exactly(sock, 4)
        size = int.from_bytes(head, "big")
        body = bytearray()
        while len(body) < len(request) + 1 + size:
            body += sock.recv(min(65536, len(request) + 1 + size - len(body)))
        assert bytes(body[:len(request) + 1]) == request + b"|"
        assert body[len(request) + 1:] == handler.value
    assert handler.answered == 200
    assert handler.peak <= high_water + 2 * (REPLY_SIZE + 64), handler.peak
    assert not handler.errors


class Fragile(Worker):
    """Worker whose reply encoding fails for b"BADENC", and whose message_received fails for
    b"crash" (reached only when it is re-dispatched from the held queue, off any callback)."""

    def __init__(self) -> None:
        super().__init__()
        self.reported: list[BaseException] = []
        self.reasons: list[CloseReason] = []
        self.all_closed = threading.Condition()

    def message_received(self, conn: Connection, message: Message) -> None:
        if bytes(message).startswith(b"crash"):
            raise RuntimeError("crashed on a held request")
        super().message_received(conn, message)

    def encode_reply(self, conn: Connection, reply: Any) -> list[Any]:
        if bytes(reply).startswith(b"BADENC"):
            raise RuntimeError("cannot encode")
        return super().encode_reply(conn, reply)

    def error(self, conn: Connection | None, exc: BaseException) -> None:
        with self.lock:
            self.reported.append(exc)

    def connection_closed(self, conn: Connection, reason: CloseReason) -> None:
        with self.all_closed:
            self.reasons.append(reason)
            self.all_closed.notify_all()


@pytest.mark.parametrize("requests", [
    [b"job a", b"badenc", b"job c"],  # the pool's reply fails to encode
    [f"job {i}".encode() for i in range(12)] + [b"crash"],  # a held request fails later
], ids=["encode", "held"])
def test_offloaded_failure_aborts_like_inline(serve: ServeFactory, clients: Clients,
                                              requests: list[bytes]) -> None:
    handler = Fragile()
    rs = run_server(serve, handler)
    bad, good = clients.connect(rs.address()), clients.connect(rs.address())
    bad.sendall(b"".join(frame(r) for r in requests))
    got = b""
    with pytest.raises(ConnectionResetError):  # aborted at once: RST, not a hang
        while chunk := bad.recv(65536):
            got += chunk
    with handler.all_closed:
        assert handler.all_closed.wait_for(lambda: bool(handler.reasons), WAIT)
    assert handler.reasons == [CloseReason.HANDLER_ERROR]
    assert [str(exc) for exc in handler.reported] in (
        [["cannot encode"], ["crashed on a held request"]])
    good.sendall(frame(b"job d") + frame(b"now e"))  # the server and its other clients are fine
    good.shutdown(socket.SHUT_WR)
    assert unframe(recv_until_eof(good)) == [b"JOB D", b"NOW E"]
