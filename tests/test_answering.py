"""``MessageHandler``'s public fast path: a framer that answers some messages itself
(``AnsweringFramer``) is handed whole reads; what it hands back runs through
``message_received``, replies keep request order across offloaded work, and
``framer_may_answer`` keeps messages from it. On every engine."""

from __future__ import annotations

import time
from collections import deque

from conftest import Clients, ServeFactory, recv_exactly

from portside import Connection, ListenerConfig, MessageHandler
from portside.messages import AnsweringFramer
from portside.protocols.framing import Buffer, LineFramer, Message


class PingFramer(LineFramer):
    """Lines; answers ``ping`` itself (``pong``), hands back any other line."""

    def __init__(self) -> None:
        super().__init__()
        self.answered = 0
        self._queue: deque[bytes] = deque()

    @property
    def reading(self) -> bool:
        return bool(self._queue)

    def serve(self, data: Buffer, limit: int) -> tuple[bytes, bytes | None]:
        self._queue.extend(bytes(line) for line in self.feed(data))
        return self.resume(data, limit)

    def resume(self, data: Buffer, limit: int) -> tuple[bytes, bytes | None]:
        replies = b""
        while self._queue and len(replies) <= limit:
            line = self._queue.popleft()
            if line != b"ping":
                return replies, line
            replies += b"pong\n"
            self.answered += 1
        return replies, None

    def rest(self, data: Buffer) -> list[bytes]:
        rest = list(self._queue)
        self._queue.clear()
        return rest


class Mixed(MessageHandler[Message]):
    """``slow`` is answered from the pool (``SLOW``), ``ping`` here is ``PONG`` (the framer's
    is ``pong``), ``begin``/``end`` keep the framer from answering between them."""

    def __init__(self) -> None:
        self.framers: list[PingFramer] = []
        self.in_python: list[bytes] = []

    def make_framer(self) -> PingFramer:
        framer = PingFramer()
        self.framers.append(framer)
        return framer

    def connection_made(self, conn: Connection, first_data: memoryview | None) -> None:
        conn.user_data = False  # inside begin ... end
        super().connection_made(conn, first_data)

    def framer_may_answer(self, conn: Connection) -> bool:
        return not conn.user_data

    def message_received(self, conn: Connection, message: Message) -> None:
        line = bytes(message)
        self.in_python.append(line)
        if line == b"slow":
            self.offload(conn, _slowly)
            return
        if line in (b"begin", b"end"):
            conn.user_data = line == b"begin"
        self.reply(conn, b"PONG" if line == b"ping" else line.upper())


def _slowly() -> bytes:
    time.sleep(0.05)
    return b"SLOW"


def test_a_line_framer_is_an_answering_framer_only_with_serve() -> None:
    assert isinstance(PingFramer(), AnsweringFramer)
    assert not isinstance(LineFramer(), AnsweringFramer)


def test_the_framer_answers_and_replies_keep_request_order(serve: ServeFactory,
                                                           clients: Clients) -> None:
    handler = Mixed()
    rs = serve(ListenerConfig(), handler=handler)
    sock = clients.connect(rs.address())
    sock.sendall(b"ping\nhello\nping\nslow\nping\nping\n")
    expected = b"pong\nHELLO\npong\nSLOW\n"
    got = recv_exactly(sock, len(expected))
    assert got == expected
    # After the offloaded ``slow``, the rest of the read waited its turn in Python.
    tail = recv_exactly(sock, 10)
    assert tail in (b"PONG\nPONG\n", b"pong\npong\n", b"PONG\npong\n"), tail
    assert handler.framers[0].answered >= 2
    assert handler.in_python[:2] == [b"hello", b"slow"]


def test_framer_may_answer_false_sends_every_message_to_message_received(
        serve: ServeFactory, clients: Clients) -> None:
    handler = Mixed()
    rs = serve(ListenerConfig(), handler=handler)
    sock = clients.connect(rs.address())
    sock.sendall(b"begin\nping\nping\nend\n")
    assert recv_exactly(sock, 20) == b"BEGIN\nPONG\nPONG\nEND\n"
    sock.sendall(b"ping\n")
    assert recv_exactly(sock, 5) == b"pong\n"
    assert handler.in_python == [b"begin", b"ping", b"ping", b"end"]
    assert handler.framers[0].answered == 1
