"""TLS on a connection without blocking the loop: ``ssl.SSLObject`` over two memory BIOs.

Theory of operation. Ciphertext read from the socket is written into the incoming BIO; the
SSLObject turns it into plaintext (bytes of one read, lent as a view) or into handshake
progress; whatever it wants to send appears in the outgoing BIO and goes out through the
ordinary write queue, so backpressure and ordering work as for plain TCP. Nothing here touches
the event loop, which is why the same class serves the epoll and asyncio engines. The handshake
happens while the connection is still pending: a client that connects and never completes it
is closed by the listener's first-data deadline, and on a data-first listener the first
plaintext bytes are what ``connection_made`` receives. A failed handshake is counted, logged
at info level through the listener's rate limiter (a burst of them leaves a few lines and a
summary), and closes only that connection.

The same session serves the client side (outbound connections, ``outbound.py``) and an
upgrade in place (``Connection.start_tls``): there ``done`` is told once the handshake ends,
instead of the listener's hand-over, and plaintext written before the handshake is over waits
in the session, to go out encrypted once it is. A client session starts the handshake itself
(``start``). ``check_context`` refuses a context made for the other side, with a line that says
which context was expected.

End of stream. A peer that ends cleanly sends close_notify before its FIN; one that just closes
the TCP connection may have been cut off (a truncation attack, or a crash). Both reach the
handler as ``eof_received``; ``conn.tls_close_notify_received`` tells them apart.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from portside.config import address_label
from portside.engine.states import CLOSED, CLOSING, OPEN, PENDING, CloseReason
from portside.errors import ConfigError, ErrorOrigin

if TYPE_CHECKING:
    from portside.engine.connection import Connection
    from portside.engine.reactor import TimerHandle

#: What a session tells once its handshake has ended: None on success, else the error.
HandshakeDone = Callable[["Connection", "BaseException | None"], None]

_SNI_ATTRIBUTE = "_portside_server_name"


def remember_server_names(context: ssl.SSLContext) -> None:
    """Wrap ``context.sni_callback`` so each connection can tell which name the client asked
    for (``conn.tls_server_name``); a callback the user set still runs."""
    original = context.sni_callback
    if getattr(original, "portside_wrapper", False):
        return

    def remember(obj: Any, server_name: str | None, ctx: ssl.SSLContext) -> int | None:
        setattr(obj, _SNI_ATTRIBUTE, server_name)
        if original is None:
            return None
        return original(obj, server_name, ctx)  # type: ignore[arg-type]

    remember.portside_wrapper = True  # type: ignore[attr-defined]
    context.sni_callback = remember


def check_context(context: object, server_side: bool, what: str) -> ssl.SSLContext:
    """``context`` if it can serve ``server_side``; else a ConfigError naming the context
    expected (``what`` says where it was given)."""
    if not isinstance(context, ssl.SSLContext):
        raise ConfigError(f"{what} needs an ssl.SSLContext, not {type(context).__name__}")
    if not server_side and context.protocol == ssl.PROTOCOL_TLS_SERVER:
        raise ConfigError(f"{what} needs a client-side TLS context (ssl.create_default_context()"
                          "), but was given a server-side one (PROTOCOL_TLS_SERVER, "
                          "Purpose.CLIENT_AUTH)")
    if server_side and context.protocol == ssl.PROTOCOL_TLS_CLIENT:
        raise ConfigError(f"{what} needs a server-side TLS context (ssl.create_default_context("
                          "ssl.Purpose.CLIENT_AUTH) with a certificate), but was given a "
                          "client-side one (PROTOCOL_TLS_CLIENT)")
    return context


def failure_reason(exc: BaseException) -> str:
    """A failed handshake's error as a person can act on it: "certificate verify failed:
    self-signed certificate", "hostname mismatch: certificate is not valid for 'x'"."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = str(exc.verify_message or "").rstrip(".")
        if message.lower().startswith("hostname mismatch"):
            rest = message.partition(",")[2].strip()
            return f"hostname mismatch: {rest}" if rest else "hostname mismatch"
        return f"certificate verify failed: {message}" if message else \
            "certificate verify failed"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"TLS handshake failed: {exc.reason.lower().replace('_', ' ')}"
    return f"TLS handshake failed: {exc}"


class TlsSession:
    """One connection's TLS: the SSL object over its two memory BIOs. The connection hands it
    ciphertext (``receive``, its receiver while TLS is on) and plaintext to send (``write``);
    it hands the connection plaintext (``Connection._plaintext``) and ciphertext to send."""

    __slots__ = ("_done", "_incoming", "_outgoing", "_waiting", "close_notify_received",
                 "handshaken", "obj", "server_name", "timer")

    def __init__(self, context: ssl.SSLContext, server_side: bool = True,
                 server_hostname: str | None = None, done: HandshakeDone | None = None) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                    server_hostname=server_hostname)
        #: The name the client asked for (SNI): told by the client, or, client side, sent.
        self.server_name: str | None = None if server_side else server_hostname
        self.close_notify_received = False
        self.handshaken = False
        self._done = done
        #: Plaintext written before the handshake ended (start_tls): sent once it has.
        self._waiting: list[bytes] = []
        #: The handshake deadline of a session that has one (outbound, start_tls).
        self.timer: TimerHandle | None = None

    def start(self, conn: Connection) -> None:
        """Client side: begin the handshake (send the ClientHello)."""
        self._handshake(conn)

    def receive(self, conn: Connection, data: memoryview) -> None:
        """Ciphertext from the peer: handshake progress, then plaintext for the handler."""
        self._incoming.write(data)
        if not self.handshaken and not self._handshake(conn):
            return
        self._read_plaintext(conn)
        self.flush(conn)

    def _handshake(self, conn: Connection) -> bool:
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            self.flush(conn)
            return False
        except (ssl.SSLError, OSError) as exc:
            self.cancel_timer()
            conn.listener.tls_failures += 1
            self.flush(conn)  # the alert, if any, so the peer learns why...
            if self._done is not None:
                self._done(conn, exc)  # outbound: connect_failed, now
            else:
                self.log_failure(conn, failure_reason(exc))
            conn.close_for(CloseReason.TLS_ERROR)  # ...sent before the FIN, not lost to a RST
            return False
        self.handshaken = True
        self.cancel_timer()
        if self.server_name is None:
            self.server_name = getattr(self.obj, _SNI_ATTRIBUTE, None)
        self.flush(conn)
        if conn._state >= CLOSING:  # the flush found the peer gone: the connection has ended
            return False
        waiting, self._waiting = self._waiting, []
        for data in waiting:
            self.write(conn, data)
        if self._done is not None:
            self._done(conn, None)
        elif not conn.listener.data_first:  # immediate: the connection is the handler's now
            conn.listener.became_active(conn)
            conn.establish(None)
        return conn._state != CLOSED

    def log_failure(self, conn: Connection, reason: str) -> None:
        """One rate-limited line about a failed handshake (a burst leaves a few and a sum)."""
        listener = conn.listener
        listener.log.log("tls-handshake", logging.INFO,
                         f"{{count}} more TLS handshakes failed on {listener.address}",
                         "TLS handshake with %s on %s failed: %s",
                         address_label(conn.peer_address), listener.address, reason)

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _read_plaintext(self, conn: Connection) -> None:
        # Plaintext comes as bytes of exactly one record's worth, not into a pooled buffer: what
        # the handler is lent (and its ``obj``) then holds this read's bytes and nothing else.
        # Decrypting costs far more than the allocation.
        size = conn._core.buffers.buffer_size
        while conn._state in (PENDING, OPEN):
            try:
                chunk = self.obj.read(size)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLZeroReturnError:  # the peer's close_notify: a clean end of stream
                self.close_notify_received = True
                conn._peer_eof()
                return
            except ssl.SSLError as exc:
                listener = conn.listener
                listener.tls_failures += 1
                listener.log.log("tls-error", logging.INFO,
                                 f"closed {{count}} more connections on {listener.address} "
                                 "for bad TLS records",
                                 "TLS error from %s on %s: %s",
                                 address_label(conn.peer_address),
                                 listener.address, exc)
                conn._abort(CloseReason.TLS_ERROR)
                return
            if not chunk:  # read() returns b"" (not raising) once the peer's close_notify came
                self.close_notify_received = True
                conn._peer_eof()
                return
            data = memoryview(chunk)
            try:
                conn._plaintext(data)
            finally:
                data.release()  # as a plain read's: a view kept past the callback is released

    def flush(self, conn: Connection) -> None:
        """Whatever TLS wants sent (records, alerts), into the connection's write path."""
        if self._outgoing.pending and conn._state != CLOSED:
            conn._send_bytes(self._outgoing.read())

    def write(self, conn: Connection, data: bytes | bytearray | memoryview) -> None:
        if not self.handshaken:  # start_tls: the handshake is under way
            self._waiting.append(bytes(data))  # copied: ``data`` may be a lent buffer
            return
        try:
            self.obj.write(data)
        except ssl.SSLError:  # after write_eof's close_notify: as the kernel refuses plain TCP
            conn._socket_failed(BrokenPipeError(errno.EPIPE, "write after write_eof"),
                                ErrorOrigin.WRITE)
            return
        self.flush(conn)

    def waiting(self) -> int:
        """Plaintext bytes held until the handshake ends."""
        return sum(len(data) for data in self._waiting)

    def close_notify(self, conn: Connection) -> None:
        """Every graceful close sends close_notify before the FIN, so the peer can tell the
        end from a truncation."""
        if self.handshaken and not conn._write_eof:  # after write_eof's FIN: too late
            # SSLWantReadError just means the peer's close_notify has not come: not waited for.
            with contextlib.suppress(ssl.SSLError, OSError):
                self.obj.unwrap()
            self.flush(conn)
