"""Handlers that speak in whole messages, with replies kept in order across offloaded work.

``MessageHandler`` runs each connection's bytes through a framer (see ``portside.protocols``)
and calls ``message_received`` with whole messages. Replies go out with ``reply`` (computed on
the loop) or ``offload`` (computed on a thread pool); both take a sequence number on arrival, so
replies leave in request order whatever order the work finishes in.

Bounded per connection, requests and replies alike. A connection with ``max_outstanding``
requests in flight stops being read until half of them are answered. And while its write queue
is above ``write_high_water`` (the peer reads slower than it asks), no further message is taken
off it: the rest of the read waits, decoded, in the sequencer's ``held`` queue and reading
pauses, until ``resume_writing`` (the queue fell to low water) hands them on. A pipelined
batch's replies are corked into one send, but the cork is flushed whenever it holds more than
high water, so the engine sees the queue grow. So 200 pipelined ``GET``s of a 1 MiB value in
one read hold about high water plus one reply, not 200 MiB. A subclass that overrides
``pause_writing``, ``resume_writing`` or ``write_drained`` must call ``super()``.

A fast path: a framer that can answer some messages itself as it parses them (an
``AnsweringFramer``, typically compiled, such as the RESP example's) is handed each read whole
while nothing is in flight or held and the write queue is under high water; its replies leave
in one write, and each message it hands back runs through ``message_received`` in its place,
so order and every limit hold as on the ordinary path.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, cast, runtime_checkable

from portside.config import address_label
from portside.connection import Connection, LayerConnection, as_layer
from portside.errors import ErrorOrigin, ProtocolError
from portside.handler import Handler, report_error
from portside.ordering import Outcome, ReplySequencer
from portside.protocols.framing import Buffer, Framer, LineFramer
from portside.reasons import CloseReason

logger = logging.getLogger("portside")

M = TypeVar("M")

_shared_executor: ThreadPoolExecutor | None = None
_shared_lock = threading.Lock()


def shared_executor(workers: int) -> ThreadPoolExecutor:
    """The process-wide pool used when a handler names none (made on first use)."""
    global _shared_executor
    with _shared_lock:
        if _shared_executor is None:
            _shared_executor = ThreadPoolExecutor(workers, thread_name_prefix="portside-offload")
        return _shared_executor


@runtime_checkable
class AnsweringFramer(Protocol[M]):
    """A framer that answers some messages itself, as it parses them: ``MessageHandler``'s
    fast path (see the module's docstring). ``serve`` begins a read, ``resume`` goes on with
    the read it stopped (the same ``data``), ``rest`` gives that read's remaining messages
    as ``feed`` would and ends it; each answers until a message it does not take (returned,
    for ``message_received``) or more than ``limit`` reply bytes, and returns the replies."""

    @property
    def reading(self) -> bool:
        """True while a read ``serve`` stopped has messages left."""
        ...

    def serve(self, data: Buffer, limit: int) -> tuple[bytes, M | None]: ...

    def resume(self, data: Buffer, limit: int) -> tuple[bytes, M | None]: ...

    def rest(self, data: Buffer) -> list[M]: ...


@dataclass(slots=True, eq=False)
class MessageSession(Generic[M]):
    """What ``MessageHandler`` keeps for each connection, in the connection's one slot for the
    layer between the engine and the handler (``conn.layer``)."""

    framer: Framer[M]
    sequencer: ReplySequencer
    #: The framer is an ``AnsweringFramer`` (looked up once, at connection_made).
    answering: bool = False


class MessageHandler(Handler, Generic[M]):
    """Subclass, give ``make_framer`` and ``message_received``; reply with ``reply`` or
    ``offload``. Messages may be views of a lent buffer: copy one (``bytes(m)``) before
    handing it to another thread."""

    #: Requests in flight per connection before reading pauses (resumes at half).
    max_outstanding: int = 64
    #: The pool for ``offload``; None uses a shared ThreadPoolExecutor of ``offload_workers``.
    executor: Executor | None = None
    offload_workers: int = 4

    def make_framer(self) -> Framer[M]:
        """A new framer for each connection; override (the default is newline-delimited)."""
        framer: Framer[Any] = LineFramer()
        return framer

    def message_received(self, conn: Connection, message: M) -> None:
        """A whole message arrived."""

    def framer(self, conn: Connection) -> Framer[M]:
        """The connection's framer (``make_framer``'s, made at ``connection_made``)."""
        framer: Framer[M] = as_layer(conn).layer.framer
        return framer

    def framer_may_answer(self, conn: Connection) -> bool:
        """Whether an ``AnsweringFramer`` may answer messages itself now (default: yes):
        asked at each read, and again before a read it stopped goes on. Return False while
        your state must see every message (inside a transaction, say)."""
        return True

    def encode_reply(self, conn: Connection, reply: Any) -> list[Any]:
        """The chunks to write for ``reply``; by default the framer's encoding."""
        framer: Framer[M] = as_layer(conn).layer.framer
        return framer.encode(reply)

    def offload_failed(self, conn: Connection, exc: BaseException) -> None:
        """Work handed to the pool raised. Default: log it once and close the connection after
        the replies before it (nothing after it is sent)."""
        logger.error("offloaded work failed on connection %d from %s: %r", conn.id,
                     address_label(conn.peer_address), exc, exc_info=exc)
        conn.close()

    def protocol_error(self, conn: Connection, exc: ProtocolError) -> None:
        """The peer broke the framing. Default: log one line and close the connection."""
        logger.warning("closing connection %d from %s: %s", conn.id,
                       address_label(conn.peer_address), exc)
        as_layer(conn).close_for(CloseReason.PROTOCOL_ERROR)

    # -- replies ---------------------------------------------------------------------------------

    def reply(self, conn: Connection, reply: Any) -> None:
        """Send ``reply`` after every earlier request's reply."""
        if not conn.is_open:
            return  # closed (by the peer, an error or an earlier reply): nobody to answer
        layered = as_layer(conn)
        sequencer: ReplySequencer = layered.layer.sequencer
        # Nothing in flight: straight out, no number needed (``outstanding``, inlined).
        if sequencer.next_issue == sequencer.next_release:
            self._send(layered, sequencer, self.encode_reply(conn, reply))
            return
        self._release(layered, sequencer.complete(sequencer.issue(), Outcome(reply)))

    def _send(self, conn: LayerConnection, sequencer: ReplySequencer, chunks: list[Any]) -> None:
        """Write one reply. Inside a corked batch, count it, and flush the cork once it holds
        more than high water: corked bytes are invisible to the engine's flow control."""
        conn.writelines(chunks)
        room = sequencer.cork_room
        if room is not None:
            for chunk in chunks:
                room -= chunk.nbytes if type(chunk) is memoryview else len(chunk)
            if room < 0:
                room = conn.listener.config.write_high_water
                conn.uncork()  # to the kernel or the write queue, where high water applies
                conn.cork()
            sequencer.cork_room = room

    def offload(self, conn: Connection, work: Callable[..., Any], *args: Any) -> None:
        """Run ``work(*args)`` on the pool; its result is the reply, sent in request order."""
        layered = as_layer(conn)
        sequencer: ReplySequencer = layered.layer.sequencer
        seq = sequencer.issue()
        conn_id = conn.id
        executor = self.executor or shared_executor(self.offload_workers)
        future = executor.submit(work, *args)

        def finished(done: Future[Any]) -> None:  # on a pool thread
            conn.call_soon_threadsafe(lambda: self._offload_done(layered, conn_id, seq, done))

        future.add_done_callback(finished)

    def _offload_done(self, conn: LayerConnection, conn_id: int, seq: int,
                      done: Future[Any]) -> None:
        """On the loop: the pool finished ``seq``. Runs outside any engine callback, so it
        isolates failures itself, as the engine does for callbacks: an exception while the
        reply is encoded or sent, or while held requests are started, reaches ``error`` and
        aborts this connection at once (never just a log line and a client left waiting)."""
        if conn.id != conn_id or conn.layer is None:
            return  # the connection closed meanwhile: nobody is waiting for this reply
        try:
            error = done.exception()
            outcome = Outcome(error=error) if error is not None else Outcome(done.result())
            sequencer: ReplySequencer = conn.layer.sequencer
            self._release(conn, sequencer.complete(seq, outcome))
            if sequencer.held and sequencer.outstanding <= self.max_outstanding // 2:
                self._dispatch(conn, sequencer, ())  # start the held requests first, in order
            self._caught_up(conn, sequencer)
        except Exception as exc:
            self._failed(conn, conn_id, exc)

    def _failed(self, conn: LayerConnection, conn_id: int, exc: Exception) -> None:
        if conn.id == conn_id and conn.is_open:
            try:
                report_error(self, conn, exc, ErrorOrigin.OFFLOAD)
            finally:
                conn.abort_for(CloseReason.HANDLER_ERROR)

    def _caught_up(self, conn: LayerConnection, sequencer: ReplySequencer) -> None:
        """Resume reading once nothing is held; close if the peer had finished."""
        if not sequencer.held and conn.is_open:
            conn.hold_reading(False)
            if sequencer.close_when_drained and sequencer.outstanding == 0:
                conn.close()  # the peer had finished, and the last held request is answered

    def _release(self, conn: LayerConnection, ready: list[Outcome]) -> None:
        sequencer: ReplySequencer = conn.layer.sequencer
        for outcome in ready:
            if not conn.is_open:
                return
            if outcome.error is not None:
                try:
                    self.offload_failed(conn, outcome.error)
                except Exception as exc:
                    self._failed(conn, conn.id, exc)
                return
            self._send(conn, sequencer, self.encode_reply(conn, outcome.value))
        if (sequencer.close_when_drained and sequencer.outstanding == 0 and not sequencer.held
                and conn.is_open):
            conn.close()

    # -- the stream side -------------------------------------------------------------------------

    def connection_made(self, conn: Connection, first_data: memoryview | None) -> None:
        framer = self.make_framer()
        as_layer(conn).layer = MessageSession(framer, ReplySequencer(),
                                              isinstance(framer, AnsweringFramer))
        super().connection_made(conn, first_data)

    def data_received(self, conn: Connection, data: memoryview) -> None:
        layered = as_layer(conn)
        session: MessageSession[M] = layered.layer
        framer = session.framer
        sequencer = session.sequencer
        if (session.answering and self.framer_may_answer(conn)
                and sequencer.next_issue == sequencer.next_release and not sequencer.held
                and conn.write_buffer_size <= conn.listener.config.write_high_water):
            self._answer_read(layered, framer, sequencer, data)
            return
        try:
            messages = framer.feed(data)
        except ProtocolError as exc:
            self.protocol_error(conn, exc)
            return
        if len(messages) > 1:
            # A pipelined batch: its replies leave in one send, not one send per reply.
            conn.cork()
            sequencer.cork_room = conn.listener.config.write_high_water
            try:
                self._dispatch(layered, sequencer, messages)
            finally:
                sequencer.cork_room = None
                conn.uncork()
        else:
            self._dispatch(layered, sequencer, messages)
        if framer.error is not None and conn.is_open:  # after the messages before the bad one
            self.protocol_error(conn, framer.error)
            return
        conn.awaiting_data(framer.buffered > 0)  # a message begun: read_timeout runs

    def _answer_read(self, conn: LayerConnection, framer: Framer[M], sequencer: ReplySequencer,
                     data: memoryview) -> None:
        """The fast path: the framer answers what it takes, into one write; a message it hands
        back goes to ``_dispatch`` (``message_received``) after the replies before it, and the
        framer goes on while nothing is in flight or held and the queue is under high water;
        else the rest of the read goes through ``_dispatch``, which holds what must wait."""
        fast = cast("AnsweringFramer[M]", framer)  # session.answering says it is one
        high_water = conn.listener.config.write_high_water
        try:
            replies, message = fast.serve(data, high_water)
        except ProtocolError as exc:
            self.protocol_error(conn, exc)
            return
        if message is not None or fast.reading:
            corked = False
            try:
                while True:
                    if replies:
                        if corked:
                            self._send(conn, sequencer, [replies])
                        else:
                            conn.write(replies)
                    if message is not None:
                        if not corked and fast.reading:
                            # Messages answered here between the framer's: still one send.
                            conn.cork()
                            sequencer.cork_room = high_water
                            corked = True
                        self._dispatch(conn, sequencer, (message,))
                    if not fast.reading:
                        break
                    if (not conn.is_open or sequencer.next_issue != sequencer.next_release
                            or sequencer.held or not self.framer_may_answer(conn)
                            or conn.write_buffer_size > high_water):
                        self._dispatch(conn, sequencer, fast.rest(data))  # held, in order
                        break
                    replies, message = fast.resume(data, high_water)
            finally:
                if corked:
                    sequencer.cork_room = None
                    conn.uncork()
        elif replies:  # the common case: every message answered
            conn.write(replies)
        if framer.error is not None and conn.is_open:  # after the messages before the bad one
            self.protocol_error(conn, framer.error)
            return
        conn.awaiting_data(framer.buffered > 0)  # a message begun: read_timeout runs

    def _dispatch(self, conn: LayerConnection, sequencer: ReplySequencer,
                  messages: Iterable[M]) -> None:
        """Hand messages to ``message_received`` until too many are outstanding or the write
        queue is over high water; hold the rest (copied: they may be views of a lent buffer)
        and stop reading until replies catch up."""
        framer: Framer[M] = conn.layer.framer
        held = sequencer.held
        limit = self.max_outstanding
        high_water = conn.listener.config.write_high_water
        for message in messages:
            # ``outstanding`` inlined: this runs once per message.
            if (held or sequencer.next_issue - sequencer.next_release >= limit
                    or conn.write_buffer_size > high_water):
                held.append(framer.detach(message))  # behind any held before it: order kept
            elif conn.is_open:
                self.message_received(conn, message)
        while (held and conn.is_open and sequencer.outstanding < limit
               and conn.write_buffer_size <= high_water):
            self.message_received(conn, held.popleft())
        if held and conn.is_open:
            conn.hold_reading(True)

    def resume_writing(self, conn: Connection) -> None:
        """The write queue fell to low water: take the held messages on (call ``super()``)."""
        self._take_held(as_layer(conn))

    def write_drained(self, conn: Connection) -> None:
        """Everything queued is sent (call ``super()`` when overriding)."""
        self._take_held(as_layer(conn))

    def _take_held(self, conn: LayerConnection) -> None:
        session: MessageSession[M] | None = conn.layer
        if session is None or not session.sequencer.held or not conn.is_open:
            return
        sequencer = session.sequencer
        if sequencer.outstanding < self.max_outstanding:
            self._dispatch(conn, sequencer, ())
            self._caught_up(conn, sequencer)

    def eof_received(self, conn: Connection) -> None:
        """The peer finished sending: answer what is in flight, then close."""
        layered = as_layer(conn)
        framer: Framer[M] = layered.layer.framer
        try:
            framer.eof()
        except ProtocolError as exc:
            self.protocol_error(conn, exc)
            return
        sequencer: ReplySequencer = layered.layer.sequencer
        if sequencer.outstanding or sequencer.held:
            sequencer.close_when_drained = True
        else:
            conn.close()
