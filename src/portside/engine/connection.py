"""One accepted socket: pooled reads, the write queue, backpressure and every way of closing.

Theory of operation. A connection moves PENDING -> OPEN -> CLOSING -> LINGERING -> CLOSED, and
may skip any middle state. PENDING exists only on data-first listeners: the kernel has accepted
but no byte has arrived, and the handler has not heard of it. OPEN connections are the handler's.
``close()`` enters CLOSING, which flushes the write queue; then our FIN goes out (``shutdown``)
and LINGERING reads and discards until the peer's FIN, because closing a socket that still has
unread bytes makes the kernel send RST, which can destroy replies the peer has not read yet.
``_finalize`` is the single exit: it closes the descriptor and calls ``connection_closed``
exactly once. A read borrows a pool buffer only for the callback; writes try ``send`` at once
and queue only what the kernel did not take, copied, since the caller's buffer may be a loan.
``write_eof`` half-closes an OPEN connection: its FIN goes out once the queue is empty, and
reading goes on. An outbound connection (``attach`` with its own handler) enters OPEN with
its connect already done (``outbound.py`` keeps connecting sockets away from these paths); its
own handler receives its callbacks, and its ``Connector`` stands where a listener would.

Close reasons. ``close_reason`` says why a connection ended, and the first reason recorded wins
(``_set_reason`` is the only place that decides): what began the end is what the handler is
told, and whatever happens while closing (the peer's reset during linger, the abort at the
drain deadline, the handler's close() inside ``connection_reset``) is its consequence. A
connection that ends without any reason recorded ends ``CLOSED``.
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import itertools
import logging
import socket
import ssl
import struct
import sys
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from portside.config import address_label
from portside.engine.buffers import LOCAL_REFCOUNT
from portside.engine.states import (
    CLOSED,
    CLOSING,
    LINGERING,
    OPEN,
    PENDING,
    SENDMSG_BATCH,
)
from portside.engine.states import CloseReason as CloseReason
from portside.engine.states import (
    State as State,
)
from portside.engine.tls import (
    TlsSession,
    check_context,
    failure_reason,
    remember_server_names,
)
from portside.errors import ConfigError, ConnectionClosedError, ErrorOrigin, ProtocolError
from portside.protocols.proxy import ProxyHeader, parse_proxy_header
from portside.statistics import ConnectionCounters

if TYPE_CHECKING:
    from portside.engine.core import EngineCore
    from portside.engine.owner import ConnectionOwner
    from portside.engine.reactor import TimerHandle
    from portside.handler import Handler

Address = Any  # a (host, port[, flowinfo, scope_id]) tuple for TCP, a path string for Unix sockets
#: What receives a connection's bytes before the handler does (see ``_start_layers``).
Receiver = Callable[["Connection", memoryview], None]

logger = logging.getLogger("portside")

_FLUSH_CHECKS = 4  # looks per linger_timeout at a closing connection's flush progress
#: Where a lingering connection's last bytes are read and dropped (never lent to anyone, so
#: loops in several threads may share it).
_DISCARDED = bytearray(16 * 1024)
_getrefcount = sys.getrefcount
_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST (abortive close)


def _check_transport(header: ProxyHeader, raw: bytearray) -> None:
    """Every listener is a stream socket, so a v2 header saying the client's connection was
    datagrams (UDP, 0x12 and 0x22) cannot describe it: refused. (v1 names only TCP4 and TCP6;
    AF_UNIX headers are refused by the parser.) The header's address family is not compared
    with the listener's: a balancer may carry IPv6 clients to an IPv4 or Unix-socket backend.
    The transport is read from the header's 14th byte, as the parser does not report it."""
    if header.version == 2 and not header.local and raw[13] & 0x0F != 0x01:
        raise ProtocolError("PROXY v2 header for a datagram (UDP) connection on a stream "
                            "listener")


_LOCALLY_CLOSED = frozenset({CloseReason.CLOSED, CloseReason.ABORTED})
_id_counter = itertools.count(1)


class Connection:
    """A client connection, as handlers see it. Methods must be called on the server's loop.

    Connection objects are pooled: after ``connection_closed`` returns, an object nobody else
    references may serve a later connection. Keep per-connection data in ``user_data``.
    """

    __slots__ = (
        "_buffered",
        "_core",
        "_corked",
        "_eof",
        "_established",
        "_fd",
        "_flow_paused",
        "_handler",
        "_held",
        "_idle",
        "_linger_timer",
        "_pool",
        "_preamble",
        "_queue",
        "_read_mark",
        "_reading",
        "_receiver",
        "_silent_looks",
        "_sock",
        "_state",
        "_tls",
        "_user_paused",
        "_write_eof",
        "_writing",
        "accepted_at",
        "balancer_address",
        "bytes_in",
        "bytes_out",
        "close_reason",
        "id",
        "layer",
        "listener",
        "peer_address",
        "proxy",
        "user_data",
    )

    def __init__(self) -> None:
        self._state = State.CLOSED
        self._fd = -1
        # The write queue is made on the first write the kernel does not take whole: an idle
        # connection holds none (an empty deque alone is over 600 bytes).
        self._queue: deque[bytes | memoryview] | None = None
        self._receiver: Receiver | None = None
        self._tls: TlsSession | None = None

    # -- life cycle, called by the listener ------------------------------------------------------

    def attach(self, core: EngineCore, listener: ConnectionOwner, sock: _socket.socket,
               peer_address: Address, pending: bool, handler: Handler) -> None:
        """Take over a socket, resetting everything a previous life left: one a listener
        accepted, or one a ``connect`` established (outbound.py), whose ``Connector`` owns it
        as a listener does its own (``ConnectionOwner``); served by ``handler``."""
        self.id = next(_id_counter)
        self.user_data: Any = None
        self.listener = listener
        self.peer_address = peer_address
        self.bytes_in = self.bytes_out = 0
        self.accepted_at = core.reactor.time()
        self.close_reason: CloseReason | None = None
        self._core = core
        # Each listener may speak its own protocol; an outbound connection names its own.
        self._use_handler(handler)
        self._pool = core.buffers
        self._idle = listener.idle_tracker
        self._sock = sock
        self._fd = sock.fileno()
        self._state = State.PENDING if pending else State.OPEN
        self._established = False
        self._eof = False
        if self._queue is not None:
            self._queue.clear()
        self._buffered = 0
        self._corked: list[bytes] | None = None
        self._user_paused = self._flow_paused = self._held = self._writing = False
        self._write_eof = False
        self._reading = True
        #: The state of the layer between the engine and the handler, if any (MessageHandler
        #: keeps its ``MessageSession`` here: framer and reply order): one slot, its type the
        #: layer's own.
        self.layer: Any = None
        #: Behind a PROXY-protocol balancer: its header, and the balancer's own address
        #: (``peer_address`` is then the original client's).
        self.proxy: ProxyHeader | None = None
        self.balancer_address: Address = None
        self._preamble: bytearray | None = None
        self._linger_timer: TimerHandle | None = None
        # The read-silence deadline's state (see awaiting_data): bytes_in when last looked at,
        # -1 once the handler manages read_timeout itself; and the looks in a row that found
        # no new byte.
        self._read_mark = 0
        self._silent_looks = 0
        if pending:  # a PROXY header, TLS or the first bytes come before the handler
            self._start_layers()
        else:
            self._tls = self._receiver = None
        core.reactor.register(self._fd, self, readable=True, writable=False)

    def _use_handler(self, handler: Any) -> None:
        """The handler this connection's callbacks go to."""
        self._handler = handler

    # -- who receives the bytes ------------------------------------------------------------------

    def _start_layers(self) -> None:
        """Choose what receives this connection's bytes first (and make its TLS session): a
        PROXY header, then TLS, then the first bytes of a data-first connection, then the
        handler (``_receiver`` None). Each receiver hands over to the next when its part is
        done, so the read path never branches on the connection's state."""
        listener = self.listener
        tls = listener.config.tls
        self._tls = TlsSession(tls) if tls is not None else None
        kind = type(self)
        if listener.proxy_protocol is not None:
            self._receiver = kind._receive_proxy_header
        else:
            self._receiver = self._after_proxy_header()

    def _after_proxy_header(self) -> Receiver | None:
        """What receives the bytes after the PROXY header (or first, without one): TLS; the
        first bytes, on a data-first listener only; else the handler. An immediate listener's
        connection is the handler's as soon as the header is whole, so that a protocol in
        which the server speaks first (a banner, a greeting) works behind a balancer."""
        kind = type(self)
        if self._tls is not None:
            return kind._receive_tls
        if self.listener.data_first:
            return kind._receive_first_data
        return None

    def _receive_first_data(self, data: memoryview) -> None:
        """Pending on a data-first listener: the first bytes make the connection active."""
        self._receiver = None
        self.listener.became_active(self)
        self.establish(data)

    def _receive_proxy_header(self, data: memoryview) -> None:
        """Pending on a PROXY-protocol listener: the balancer's header comes first. Once it is
        whole, the connection goes on like any other, with the client's address."""
        rest = self._take_proxy_header(data)
        if rest is None:
            return  # incomplete (wait) or refused (closed)
        try:
            self._receiver = self._after_proxy_header()
            if self._receiver is None:  # immediate: the connection is the handler's now,
                self.listener.became_active(self)  # and what came with the header is data
                self.establish(None)
            if rest and self._state <= State.OPEN:
                self._pass_on(rest)
        finally:
            rest.release()

    def _receive_tls(self, data: memoryview) -> None:
        assert self._tls is not None
        self._tls.receive(self, data)

    def _plaintext(self, data: memoryview) -> None:
        """Bytes TLS decrypted: the first ones of a data-first connection, or the handler's."""
        if self._state == State.PENDING:
            self.listener.became_active(self)
            self.establish(data)
        elif self._state == State.OPEN:
            try:  # the handler's exception is its own, not the TLS layer's
                self._handler.data_received(self, data)
            except Exception as exc:
                self._handler_failed(exc)

    def _pass_on(self, data: memoryview) -> None:
        """Bytes for whoever receives them now (after a PROXY header); an exception is
        reported as that receiver's, or the handler's, never the PROXY layer's."""
        receiver = self._receiver
        try:
            if receiver is not None:
                receiver(self, data)
            elif self._state == State.OPEN:
                self._handler.data_received(self, data)
        except Exception as exc:
            self._handler_failed(exc, ErrorOrigin.CALLBACK if receiver is None
                                 else layer_origin(receiver))

    def establish(self, first_data: memoryview | None) -> None:
        """Hand the connection to the handler: ``connection_made`` (with data when data-first)."""
        self._state = State.OPEN
        self._established = True
        silence = self.listener.silence
        if silence is not None:  # read_timeout is on: it runs until the handler takes it over
            self._read_mark = self.bytes_in
            silence.start(self)
        try:
            self._handler.connection_made(self, first_data)
        except Exception as exc:
            self._handler_failed(exc)

    # -- what handlers call ----------------------------------------------------------------------

    @property
    def local_address(self) -> Address:
        """Where the connection arrived (asked of the kernel when wanted, not stored)."""
        try:
            return self._sock.getsockname()
        except OSError:
            return None

    @property
    def tls(self) -> ssl.SSLObject | None:
        """The TLS session's ``ssl.SSLObject`` (``selected_alpn_protocol()``, ``version()``,
        ``cipher()``, ``getpeercert()``); None on a plain connection."""
        return self._tls.obj if self._tls is not None else None

    @property
    def tls_server_name(self) -> str | None:
        """The name the client asked for (SNI), on a TLS connection."""
        return self._tls.server_name if self._tls is not None else None

    @property
    def tls_close_notify_received(self) -> bool:
        """True once the peer ended its side cleanly with a TLS close_notify. At
        ``eof_received`` or ``connection_closed``, False on a TLS connection means the peer (or
        something between) closed the TCP connection without it: the data may be truncated."""
        return self._tls is not None and self._tls.close_notify_received

    @property
    def is_open(self) -> bool:
        """True until close() or abort() is called or the connection fails."""
        return self._state == State.OPEN

    @property
    def is_pending(self) -> bool:
        return self._state == State.PENDING

    @property
    def write_buffer_size(self) -> int:
        """Bytes written but not yet taken by the kernel."""
        return self._buffered

    @property
    def eof_received(self) -> bool:
        """True once the peer has closed its sending side."""
        return self._eof

    @property
    def reading_paused(self) -> bool:
        return self._user_paused or self._flow_paused or self._held

    def counters(self) -> ConnectionCounters:
        return ConnectionCounters(
            self.bytes_in, self.bytes_out, self._buffered,
            self._core.reactor.time() - self.accepted_at,
        )

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` to be sent in order; never blocks.

        Sends at once what the kernel takes and copies the rest, so ``data`` may be the buffer a
        callback was lent. Past ``write_high_water`` unsent bytes, reading pauses and the handler's
        ``pause_writing`` is called. Raises ConnectionClosedError after close() or abort();
        writes to a connection the peer or an error closed are dropped silently.
        """
        if self._state != OPEN:
            if self.close_reason in _LOCALLY_CLOSED or self._state == PENDING:
                raise ConnectionClosedError(f"connection {self.id} is closed")
            return
        if self._tls is not None:
            self._write_tls(data)
            return
        if self._queue:
            self._send_bytes(data)
            return
        if self._corked is not None:
            self._corked.append(bytes(data))  # copied: ``data`` may be a lent buffer
            return
        # The fast path: nothing queued, and the kernel usually takes it all at once. It
        # repeats _send_bytes on purpose: one Python call less on every write (bench/NOTES.md).
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._socket_failed(exc, ErrorOrigin.WRITE)
            return
        if sent:
            self.bytes_out += sent
            if self._idle is not None:
                self._idle.start(self)
        size = data.nbytes if type(data) is memoryview else len(data)
        if sent != size:
            self._queue_rest(data, sent, size)

    def _write_tls(self, data: bytes | bytearray | memoryview) -> None:
        """Plaintext from the handler: encrypted, then into the ordinary write path (held,
        up to write_limit, while a start_tls handshake is under way)."""
        tls = self._tls
        assert tls is not None
        if self._corked is not None:
            self._corked.append(bytes(data))
        elif data:
            if not tls.handshaken:
                held = tls.waiting() + memoryview(data).nbytes
                if held > self.listener.config.write_limit:
                    self._buffered = held
                    self._output_limit_passed(self.listener.config.write_limit)
                    return
            tls.write(self, data)

    # -- STARTTLS ------------------------------------------------------------------------------

    def start_tls(self, context: ssl.SSLContext, *, server_side: bool = False,
                  server_hostname: str | None = None, unread: int = 0,
                  handshake_timeout: float | None = None) -> bool:
        """Upgrade this plain, open connection to TLS in place (STARTTLS). Bytes written before
        the call go out in the clear (the "go ahead" reply); bytes written after it wait and
        go out encrypted once the handshake is done, when the handler's ``tls_established``
        is called. Bytes read from now on are TLS records.

        ``unread`` is how many plaintext bytes the caller holds past the command that asked
        for TLS (its parser's leftovers, the rest of the current read). They came in the
        clear after the command, so they must not be taken for protected data (the STARTTLS
        injection, CVE-2011-0411): with ``unread`` > 0 the upgrade is refused, the connection
        is closed (``PROTOCOL_ERROR``, one log line) and False is returned; else True.

        ``handshake_timeout`` (default: the listener's ``first_data_timeout``, the bound a TLS
        listener gives a new client) resets a connection whose handshake has not finished in
        time (``TLS_ERROR``). A client-side upgrade checks the server's certificate and name
        as ``context`` says; ``server_hostname`` is required when it checks the name.

        Error handling: a wrong context, a missing server_hostname or a connection already
        on TLS raise ConfigError; a closed connection raises ConnectionClosedError.
        """
        if self._state != State.OPEN:
            raise ConnectionClosedError(f"connection {self.id} is not open")
        if self._tls is not None or self._receiver is not None:
            raise ConfigError(f"connection {self.id} already speaks TLS")
        check_context(context, server_side, "start_tls")
        if not server_side and context.check_hostname and not server_hostname:
            raise ConfigError("start_tls needs server_hostname: the context checks the "
                              "server's name (check_hostname)")
        listener = self.listener
        if unread:
            listener.log.log("starttls-unread", logging.WARNING,
                             f"closed {{count}} more connections on {listener.address} for "
                             "plaintext after STARTTLS",
                             "closed %r on %s: %d plaintext bytes came after the STARTTLS "
                             "command, before the TLS handshake (refused: they would pass "
                             "for protected data)", self.peer_address, listener.address,
                             unread)
            self._begin_close(CloseReason.PROTOCOL_ERROR)
            return False
        timeout = listener.config.first_data_timeout if handshake_timeout is None \
            else handshake_timeout
        if not 0 < timeout < float("inf"):
            raise ConfigError(f"handshake_timeout must be a positive number of seconds, not "
                              f"{timeout!r}")
        if self._corked is not None:
            self.uncork()  # written before the switch: in the clear
        if server_side:
            remember_server_names(context)  # conn.tls_server_name, as on a TLS listener
        session = TlsSession(context, server_side, server_hostname,
                             done=type(self)._start_tls_done)
        self._tls = session
        self._receiver = type(self)._receive_tls
        session.timer = self._core.reactor.call_later(
            timeout, lambda: self._tls_handshake_expired(session, timeout))
        if not server_side:
            session.start(self)
        return True

    def _start_tls_done(self, exc: BaseException | None) -> None:
        """A start_tls handshake ended: the handler hears ``tls_established``; a failure is
        logged (the connection then closes, TLS_ERROR)."""
        tls = self._tls
        if exc is not None:
            if tls is not None:
                tls.log_failure(self, failure_reason(exc))
            return
        if self._state == State.OPEN:
            self._call("tls_established")

    def _tls_handshake_expired(self, session: TlsSession, timeout: float) -> None:
        session.timer = None
        if self._tls is not session or session.handshaken or self._state == State.CLOSED:
            return  # done, or the object serves another connection now
        self.listener.tls_failures += 1
        session.log_failure(self, f"the handshake did not complete within {timeout:g} s")
        self._abort(CloseReason.TLS_ERROR)

    def _send_bytes(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes for the socket, in order: sent at once where possible, else queued."""
        size = data.nbytes if type(data) is memoryview else len(data)
        if not size or self._state == CLOSED:
            return
        if self._queue:
            self._queue.append(data if type(data) is bytes else bytes(data))
            self._buffered += size
            self._check_high_water()
            return
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._socket_failed(exc, ErrorOrigin.WRITE)
            return
        self._count_sent(sent)
        if sent != size:
            self._queue_rest(data, sent, size)

    def _queue_rest(self, data: bytes | bytearray | memoryview, sent: int, size: int) -> None:
        """Keep what the kernel did not take, copied (``data`` may be a lent buffer)."""
        queue = self._queue
        if queue is None:
            queue = self._queue = deque()
        queue.append(bytes(memoryview(data).cast("B")[sent:]))
        self._buffered += size - sent
        self._set_writing(True)
        self._check_high_water()

    def _check_high_water(self) -> None:
        """The queue grew: past write_high_water pause reading; past write_limit reset."""
        config = self.listener.config
        if self._buffered > config.write_high_water:
            if self._buffered > config.write_limit:
                self._output_limit_passed(config.write_limit)
            elif not self._flow_paused:
                self._flow_paused = True
                self._update_reading()
                self._call("pause_writing")

    def _output_limit_passed(self, limit: int) -> None:
        """The peer reads nothing while its handler keeps writing: reset at once (Redis's
        client-output-buffer-limit), dropping the queue, rather than hold unbounded output."""
        listener = self.listener
        listener.log.log("output-limit", logging.WARNING,
                         f"reset {{count}} more connections on {listener.address}: queued "
                         f"output past write_limit ({limit:,} bytes)",
                         "reset %s on %s: %s bytes of output queued, past write_limit (%s)",
                         address_label(self.peer_address), listener.address, f"{self._buffered:,}",
                         f"{limit:,}")
        self._abort(CloseReason.OUTPUT_LIMIT)

    def writelines(self, chunks: list[bytes | bytearray | memoryview]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def cork(self) -> None:
        """Hold writes back until ``uncork``, which sends them in one go (as TCP_CORK does, in
        user space): many small replies to one read then cost one send, not one each."""
        if self._corked is None:
            self._corked = []

    def uncork(self) -> None:
        """Send what was written since ``cork`` (``close`` uncorks by itself)."""
        corked, self._corked = self._corked, None
        if corked and self._state == OPEN:
            self.write(b"".join(corked))

    def pause_reading(self) -> None:
        """Stop reading until ``resume_reading``; the kernel buffers, then TCP slows the peer."""
        self._user_paused = True
        self._update_reading()

    def resume_reading(self) -> None:
        self._user_paused = False
        self._update_reading()

    def hold_reading(self, held: bool) -> None:
        """Pause (True) or resume reading on behalf of a layer such as ordered offload; kept
        apart from ``pause_reading`` so that neither undoes the other."""
        self._held = held
        self._update_reading()

    def awaiting_data(self, owed: bool) -> None:
        """Say whether the peer owes us bytes (a message begun but not finished): while it
        does, the listener's ``read_timeout`` runs from the moment it began. The message layer
        calls this from its framer; a plain handler may call it itself.

        Until the first call, ``read_timeout`` means "no byte from the peer for that long"
        (looked at a few times per timeout, so it fires after between read_timeout and 1.25
        read_timeout of silence); from the first call on, the handler decides what is owed.
        """
        listener = self.listener
        tracker = listener.read_tracker
        if tracker is None or self._state != State.OPEN:
            return
        if self._read_mark >= 0:
            self._read_mark = -1
            assert listener.silence is not None
            listener.silence.stop(self)
        if not owed:
            tracker.stop(self)
        elif self not in tracker.queue:
            tracker.start(self)

    def write_eof(self) -> None:
        """Half-close (asyncio's ``write_eof``): send every queued byte (on TLS then
        close_notify), then FIN, and go on reading. Write nothing after it (the kernel
        refuses: the connection then resets); ``close()`` ends the connection as usual."""
        if self._state != State.OPEN or self._write_eof:
            return
        if self._corked is not None:
            self.uncork()
        if self._tls is not None:  # close_notify before the FIN: a TLS peer then sees the
            self._tls.close_notify(self)  # end of our stream, not a truncation
            if self._state != State.OPEN:
                return
        self._write_eof = True
        if not self._queue:
            self._shutdown_write()

    def _shutdown_write(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:  # the peer's RST came first (to a close_notify)
                exc = ConnectionResetError(errno.ECONNRESET, "reset by the peer")
            self._socket_failed(exc)

    def call_soon_threadsafe(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` on this connection's loop: the way other threads reach it."""
        self._core.reactor.call_soon_threadsafe(callback)

    def close(self) -> None:
        """Graceful close: send every queued byte, then FIN; ``connection_closed`` follows."""
        self._begin_close(CloseReason.CLOSED)

    def abort(self) -> None:
        """Abortive close: drop unsent bytes and reset the connection (RST) now."""
        if self._state != State.CLOSED:
            self._abort(CloseReason.ABORTED)

    # -- readiness, called by the reactor --------------------------------------------------------

    def handle_read(self) -> None:
        state = self._state
        if state >= CLOSING:
            if state == LINGERING:
                self._discard_until_eof()
            return
        # The buffer pool, inlined: this runs once per read of every connection.
        pool = self._pool
        free = pool.free
        buffer = free.pop() if free else pool.allocate()
        try:
            received = self._sock.recv_into(buffer)
        except (BlockingIOError, InterruptedError):
            free.append(buffer)
            return
        except OSError as exc:
            free.append(buffer)
            self._socket_failed(exc, ErrorOrigin.READ)
            return
        if not received:
            free.append(buffer)
            self._peer_eof()
            return
        if not self.bytes_in:
            self.listener.record_first_byte(self._core.reactor.time() - self.accepted_at)
        self.bytes_in += received
        if self._idle is not None:
            self._idle.start(self)
        # Past this read, the buffer (``data.obj``) holds zeros, never an earlier read's bytes
        # (buffers.py): a longer read before this one left some, cleared here.
        dirty = buffer.dirty
        if dirty > received:
            buffer[received:dirty] = bytes(dirty - received)
        buffer.dirty = received
        data = memoryview(buffer)[:received]
        receiver = self._receiver
        try:
            if receiver is None:
                self._handler.data_received(self, data)
            else:  # a PROXY header, TLS, or a data-first connection's first bytes
                receiver(self, data)
        except Exception as exc:
            # The layers catch the handler's exceptions where they hand bytes on, so what
            # escapes a receiver is portside's own (see layer_origin).
            self._handler_failed(exc, ErrorOrigin.CALLBACK if receiver is None
                                 else layer_origin(receiver))
        finally:
            # A handler that kept ``data`` gets an error, not another peer's bytes; if it kept
            # a slice or an export of it, the pool sees the buffer is still in use and drops it.
            try:  # noqa: SIM105 (free in 3.11; contextlib.suppress costs two calls per read)
                data.release()
            except BufferError:
                pass
            del data
            # Back to the pool, unless a view of it is still alive (resizing fails then) or
            # the handler kept the buffer itself (``data.obj``).
            pool.returned += 1
            try:
                buffer.append(0)
            except BufferError:
                pool.discard()
            else:
                del buffer[-1]
                if _getrefcount(buffer) > LOCAL_REFCOUNT:
                    pool.discard()
                else:
                    free.append(buffer)

    def _take_proxy_header(self, data: memoryview) -> memoryview | None:
        """Collect and parse the PROXY header; the bytes after it once it is whole, else None
        (incomplete, or malformed: then the connection is closed and counted)."""
        listener = self.listener
        accept = listener.proxy_protocol
        assert accept is not None
        preamble = self._preamble
        if preamble is None:
            preamble = self._preamble = bytearray()
        preamble += data
        try:
            header = parse_proxy_header(preamble, accept)
            if isinstance(header, ProxyHeader):
                _check_transport(header, preamble)
        except ProtocolError as exc:
            listener.proxy_errors += 1
            listener.log.log("proxy-error", logging.INFO,
                             f"closed {{count}} more connections on {listener.address} for a "
                             "missing or bad PROXY header",
                             "closed %s on %s: %s", address_label(self.peer_address),
                             listener.address, exc)
            self._abort(CloseReason.PROTOCOL_ERROR)
            return None
        if not isinstance(header, ProxyHeader):
            return None  # not complete yet: still pending
        self.proxy = header
        self.balancer_address = self.peer_address
        if header.source is not None:
            self.peer_address = header.source
        self._preamble = None
        # The per-client limits count the client the header names (a LOCAL header, the
        # balancer's own health check, names none and is not counted).
        if listener.admission is not None and header.source is not None and \
                not listener.admit_client(self):
            self._abort(CloseReason.CLIENT_LIMIT)
            return None
        return memoryview(bytes(preamble[header.length:]))

    def handle_write(self) -> None:
        queue = self._queue
        if self._state == CLOSED or not queue:
            return
        try:
            if len(queue) == 1:
                sent = self._sock.send(queue[0])
            else:
                sent = self._sock.sendmsg(itertools.islice(queue, SENDMSG_BATCH))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._socket_failed(exc, ErrorOrigin.WRITE)
            return
        self._count_sent(sent)
        self._buffered -= sent
        if sent and self.listener.write_tracker is not None:
            self.listener.write_tracker.start(self)  # progress: the peer is reading
        while sent:
            head = queue[0]
            size = len(head) if not isinstance(head, memoryview) else head.nbytes
            if sent >= size:
                queue.popleft()
                sent -= size
            else:
                queue[0] = memoryview(head)[sent:]
                sent = 0
        if self._flow_paused and self._buffered <= self.listener.config.write_low_water:
            self._flow_paused = False
            self._update_reading()
            self._call("resume_writing")
        if not queue:
            self._set_writing(False)
            if self._state == State.CLOSING:
                self._send_fin()
            elif self._state == State.OPEN:
                if self._write_eof:
                    self._shutdown_write()  # the half-close write_eof asked for
                if self._state == State.OPEN:
                    self._call("write_drained")

    # -- closing ---------------------------------------------------------------------------------

    def close_for(self, reason: CloseReason) -> None:
        """Graceful close on the server's behalf (shutdown, timeouts), recording ``reason``."""
        self._begin_close(reason)

    def abort_for(self, reason: CloseReason) -> None:
        """Abortive close on the server's behalf (RST now), recording ``reason``."""
        if self._state != State.CLOSED:
            self._abort(reason)

    def _begin_close(self, reason: CloseReason) -> None:
        if self._state >= State.CLOSING:
            return
        if self._corked is not None:
            self.uncork()  # what was written before close() is still sent
            if self._state >= State.CLOSING:  # the send failed: the connection has ended
                return
        was_open = self._state == State.OPEN
        # CLOSING before the close_notify goes out: sending it may find the peer gone, and
        # the connection then ends (``_finalize``) inside this call; nothing below may bring
        # it back to life, or it would be closed, counted and recycled a second time.
        self._set_reason(reason)
        self._state = State.CLOSING
        if self._tls is not None and was_open:
            self._tls.close_notify(self)  # before the FIN, so the peer can tell an end
            if self._state != State.CLOSING:
                return
        self._update_reading()
        if not self._queue:
            self._send_fin()
        else:
            self._arm_flush_deadline()

    # A closing connection flushes its queue before its FIN; a peer that never reads would keep
    # it CLOSING for ever (the idle tracker skips closing connections, and the write timeout is
    # off by default), holding its descriptor and queue: the relay's orphaned upstreams. So the
    # flush has a deadline, linger_timeout without progress, after which the connection is
    # reset. A timer looks every quarter of it (so the reset comes 1-1.25 linger_timeout after
    # the last byte sent); it lives in ``_linger_timer``, cancelled by ``_send_fin`` and
    # ``_finalize``, so a pooled connection never meets a stale one. Borrowed by the compiled
    # engine (_begin_close_c): no new field on either.
    def _arm_flush_deadline(self, sent: int = -1, quiet: int = 0) -> None:
        """Reset this CLOSING connection once its queue makes no progress for linger_timeout
        (0: no deadline, as before)."""
        timeout = self._core.config.linger_timeout
        if not timeout:
            return
        sent = self.bytes_out if sent < 0 else sent
        self._linger_timer = self._core.reactor.call_later(
            timeout / _FLUSH_CHECKS, lambda: self._flush_check(sent, quiet))

    def _flush_check(self, sent: int, quiet: int) -> None:
        self._linger_timer = None
        if self._state != State.CLOSING:
            return
        quiet = quiet + 1 if self.bytes_out == sent else 0  # the peer took some: start again
        if quiet < _FLUSH_CHECKS:
            self._arm_flush_deadline(self.bytes_out, quiet)
            return
        self._abort(CloseReason.WRITE_TIMEOUT)  # the reason of close() stays: the first wins

    def _send_fin(self) -> None:
        if self._eof:  # the peer has sent its FIN already: nothing left to wait for
            self._finalize()
            return
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._finalize()
            return
        self._state = State.LINGERING
        self._reading = False
        self._update_reading()
        if self._linger_timer is not None:  # the flush deadline (_arm_flush_deadline)
            self._linger_timer.cancel()
        self._linger_timer = self._core.reactor.call_later(
            self._core.config.linger_timeout, self._finalize)

    def _discard_until_eof(self) -> None:
        try:  # into a scratch buffer that nobody reads: these bytes are never lent
            received = self._sock.recv_into(_DISCARDED)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            received = 0
        if not received:
            self._finalize()

    def _set_reason(self, reason: CloseReason) -> CloseReason:
        """Record why the connection ends, unless a reason is recorded already: the first
        wins (see the module docstring). Returns the reason in force."""
        if self.close_reason is None:
            self.close_reason = reason
        return self.close_reason

    def _abort(self, reason: CloseReason) -> None:
        self._set_reason(reason)
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        self._finalize()

    def _peer_eof(self) -> None:
        self._eof = True
        if self._state == State.PENDING:
            self._set_reason(CloseReason.PEER_EOF)
            self._finalize()
            return
        self._reading = False
        self._update_reading()
        self._call("eof_received")

    def _socket_failed(self, exc: OSError, origin: ErrorOrigin = ErrorOrigin.READ) -> None:
        if isinstance(exc, TimeoutError):
            self._peer_timed_out()
            return
        if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
            first = self.close_reason is None
            if self._state != State.CLOSED:
                self._set_reason(CloseReason.RESET)
            if first and self._state == State.OPEN:
                # Reason set first: a write inside the callback fails again, quietly.
                self._call("connection_reset")
            self._finalize()
            return
        if self._state != State.CLOSED:
            self._set_reason(CloseReason.SOCKET_ERROR)
            if self._established:
                self._core.report_error(self, exc, origin)
            self._finalize()

    def _peer_timed_out(self) -> None:
        """ETIMEDOUT: keepalive or TCP_USER_TIMEOUT (the listener's so_keepalive and
        tcp_user_timeout) found the peer gone. Asked for, so not an error: counted by its
        close reason and logged at a limited rate."""
        if self._state == State.CLOSED:
            return
        listener = self.listener
        listener.log.log("peer-timeout", logging.INFO,
                         f"closed {{count}} more connections on {listener.address}: the peer "
                         "stopped answering (keepalive or tcp_user_timeout)",
                         "closed %s on %s: the peer stopped answering (keepalive or "
                         "tcp_user_timeout)", address_label(self.peer_address), listener.address)
        self._set_reason(CloseReason.PEER_TIMEOUT)
        self._finalize()

    def _handler_failed(self, exc: Exception,
                        origin: ErrorOrigin = ErrorOrigin.CALLBACK) -> None:
        self._core.report_error(self, exc, origin)
        if self._state != State.CLOSED:
            self._abort(CloseReason.HANDLER_ERROR)

    def _finalize(self) -> None:
        """The single exit: release the socket and tell the handler, exactly once."""
        if self._state == State.CLOSED:
            return
        self._state = State.CLOSED
        if self._fd < 0:
            # Closed and counted already, then brought back to life by a bug: its descriptor
            # number may be another socket's now, and its counts are settled. Reported, never
            # closed or counted twice.
            self._core.finished_twice(self)
            return
        reason = self._set_reason(CloseReason.CLOSED)
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        core = self._core
        core.reactor.unregister(self._fd, closing=True)
        self._sock.close()
        if self._queue is not None:
            self._queue.clear()
        self._buffered = 0
        self.listener.connection_finished(self, was_pending=not self._established)
        try:
            self._handler.connection_closed(self, reason)
        except Exception as exc:
            core.report_error(self, exc)
        self._receiver = None
        self._tls = None  # the SSL object is not for the connection this object serves next
        self._fd = -1  # closed: no later call can reach the number, which the kernel reuses
        core.connection_finished(self)

    # -- helpers ---------------------------------------------------------------------------------

    def _count_sent(self, sent: int) -> None:
        self.bytes_out += sent
        if sent and self._idle is not None:
            self._idle.start(self)

    def _set_writing(self, writing: bool) -> None:
        # Closed (a callback such as resume_writing may close it just before): its descriptor
        # is gone, and the trackers have let it go.
        if writing != self._writing and self._state != CLOSED:
            self._writing = writing
            self._core.reactor.modify(self._fd, self._wants_read(), writing)
            # The write timeout runs while bytes wait for the peer to take them.
            tracker = self.listener.write_tracker
            if tracker is not None:
                if writing:
                    tracker.start(self)
                else:
                    tracker.stop(self)

    def _wants_read(self) -> bool:
        if self._state == State.LINGERING:
            return True
        return (self._reading and self._state <= State.OPEN
                and not self._user_paused and not self._flow_paused and not self._held)

    def _update_reading(self) -> None:
        if self._state != State.CLOSED:
            self._core.reactor.modify(self._fd, self._wants_read(), self._writing)

    def _call(self, callback: str) -> None:
        """Run a handler callback, looked up now (the rule on ``Handler``'s docstring)."""
        try:
            getattr(self._handler, callback)(self)
        except Exception as exc:
            self._handler_failed(exc)

    def __repr__(self) -> str:
        return (f"<Connection {getattr(self, 'id', '?')} {State(self._state).name.lower()} "
                f"peer={getattr(self, 'peer_address', None)!r}>")


def layer_origin(receiver: Receiver) -> ErrorOrigin:
    """Which of portside's layers ``receiver`` is: what an exception escaping it is reported
    as (each layer catches the handler's exceptions where it hands bytes on). The compiled
    connection borrows these two functions, so the test holds on both engines."""
    if receiver is Connection._receive_proxy_header:
        return ErrorOrigin.PROXY
    if receiver is Connection._receive_tls:
        return ErrorOrigin.TLS
    return ErrorOrigin.READ
