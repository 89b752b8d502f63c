"""Handlers that speak in whole messages, with replies kept in order across offloaded work.

``MessageHandler`` runs each connection's bytes through a framer (see ``portside.protocols``)
and calls ``message_received`` with whole messages. Replies go out with ``reply`` (computed on
the loop) or ``offload`` (computed on a thread pool); both take a sequence number on arrival, so
replies leave in request order whatever order the work finishes in. A connection with
``max_outstanding`` requests in flight stops being read until half of them are answered.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from portside.engine.connection import CloseReason, Connection
from portside.errors import ProtocolError
from portside.handler import Handler
from portside.ordering import Outcome, ReplySequencer
from portside.protocols.framing import Framer, LineFramer

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

    def encode_reply(self, conn: Connection, reply: Any) -> list[Any]:
        """The chunks to write for ``reply``; by default the framer's encoding."""
        framer: Framer[M] = conn.framer
        return framer.encode(reply)

    def offload_failed(self, conn: Connection, exc: BaseException) -> None:
        """Work handed to the pool raised. Default: log it once and close the connection after
        the replies before it (nothing after it is sent)."""
        logger.error("offloaded work failed on connection %d from %r: %r", conn.id,
                     conn.peer_address, exc, exc_info=exc)
        conn.close()

    def protocol_error(self, conn: Connection, exc: ProtocolError) -> None:
        """The peer broke the framing. Default: log one line and close the connection."""
        logger.warning("closing connection %d from %r: %s", conn.id, conn.peer_address, exc)
        conn.close_for(CloseReason.PROTOCOL_ERROR)

    # -- replies ---------------------------------------------------------------------------------

    def reply(self, conn: Connection, reply: Any) -> None:
        """Send ``reply`` after every earlier request's reply."""
        if not conn.is_open:
            return  # closed (by the peer, an error or an earlier reply): nobody to answer
        sequencer: ReplySequencer = conn.sequencer
        if sequencer.outstanding == 0:  # nothing in flight: straight out, no number needed
            conn.writelines(self.encode_reply(conn, reply))
            return
        self._release(conn, sequencer.complete(sequencer.issue(), Outcome(reply)))

    def offload(self, conn: Connection, work: Callable[..., Any], *args: Any) -> None:
        """Run ``work(*args)`` on the pool; its result is the reply, sent in request order."""
        sequencer: ReplySequencer = conn.sequencer
        seq = sequencer.issue()
        conn_id = conn.id
        executor = self.executor or shared_executor(self.offload_workers)
        future = executor.submit(work, *args)

        def finished(done: Future[Any]) -> None:  # on a pool thread
            conn.call_soon_threadsafe(lambda: self._offload_done(conn, conn_id, seq, done))

        future.add_done_callback(finished)

    def _offload_done(self, conn: Connection, conn_id: int, seq: int, done: Future[Any]) -> None:
        if conn.id != conn_id or conn.sequencer is None:
            return  # the connection closed meanwhile: nobody is waiting for this reply
        error = done.exception()
        outcome = Outcome(error=error) if error is not None else Outcome(done.result())
        sequencer: ReplySequencer = conn.sequencer
        self._release(conn, sequencer.complete(seq, outcome))
        if sequencer.held and sequencer.outstanding <= self.max_outstanding // 2:
            self._dispatch(conn, sequencer, ())  # start the held requests first, in order
        if not sequencer.held and conn.is_open:
            conn.hold_reading(False)
            if sequencer.close_when_drained and sequencer.outstanding == 0:
                conn.close()  # the peer had finished, and the last held request is answered

    def _release(self, conn: Connection, ready: list[Outcome]) -> None:
        sequencer: ReplySequencer = conn.sequencer
        for outcome in ready:
            if not conn.is_open:
                return
            if outcome.error is not None:
                try:
                    self.offload_failed(conn, outcome.error)
                except Exception as exc:
                    self.error(conn, exc)
                    conn.abort()
                return
            conn.writelines(self.encode_reply(conn, outcome.value))
        if (sequencer.close_when_drained and sequencer.outstanding == 0 and not sequencer.held
                and conn.is_open):
            conn.close()

    # -- the stream side -------------------------------------------------------------------------

    def connection_made(self, conn: Connection, first_data: memoryview | None) -> None:
        conn.framer = self.make_framer()
        conn.sequencer = ReplySequencer()
        super().connection_made(conn, first_data)

    def data_received(self, conn: Connection, data: memoryview) -> None:
        framer: Framer[M] = conn.framer
        try:
            messages = framer.feed(data)
        except ProtocolError as exc:
            self.protocol_error(conn, exc)
            return
        if len(messages) > 1:
            # A pipelined batch: its replies leave in one send, not one send per reply.
            conn.cork()
            try:
                self._dispatch(conn, conn.sequencer, messages)
            finally:
                conn.uncork()
        else:
            self._dispatch(conn, conn.sequencer, messages)
        if framer.error is not None and conn.is_open:  # after the messages before the bad one
            self.protocol_error(conn, framer.error)
            return
        conn.awaiting_data(framer.buffered > 0)  # a message begun: read_timeout runs

    def _dispatch(self, conn: Connection, sequencer: ReplySequencer,
                  messages: Iterable[M]) -> None:
        """Hand messages to ``message_received`` until too many are outstanding; hold the rest
        (copied: they may be views of a lent buffer) and stop reading until replies catch up."""
        framer: Framer[M] = conn.framer
        held = sequencer.held
        for message in messages:
            if held or sequencer.outstanding >= self.max_outstanding:
                held.append(framer.detach(message))  # behind any held before it: order kept
            elif conn.is_open:
                self.message_received(conn, message)
        while held and conn.is_open and sequencer.outstanding < self.max_outstanding:
            self.message_received(conn, held.popleft())
        if held and conn.is_open:
            conn.hold_reading(True)

    def eof_received(self, conn: Connection) -> None:
        """The peer finished sending: answer what is in flight, then close."""
        framer: Framer[M] = conn.framer
        try:
            framer.eof()
        except ProtocolError as exc:
            self.protocol_error(conn, exc)
            return
        sequencer: ReplySequencer = conn.sequencer
        if sequencer.outstanding or sequencer.held:
            sequencer.close_when_drained = True
        else:
            conn.close()
