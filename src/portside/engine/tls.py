"""TLS on a connection without blocking the loop: ``ssl.SSLObject`` over two memory BIOs.

Theory of operation. Ciphertext read from the socket is written into the incoming BIO; the
SSLObject turns it into plaintext (read straight into a pooled buffer) or into handshake
progress; whatever it wants to send appears in the outgoing BIO and goes out through the
ordinary write queue, so backpressure and ordering work as for plain TCP. Nothing here touches
the event loop, which is why the same class serves the epoll and asyncio engines. The handshake
happens while the connection is still pending: a client that connects and never completes it
is closed by the listener's first-data deadline, and on a data-first listener the first
plaintext bytes are what ``connection_made`` receives. A failed handshake is counted, logged
at info level through the listener's rate limiter (a burst of them leaves a few lines and a
summary), and closes only that connection.

End of stream. A peer that ends cleanly sends close_notify before its FIN; one that just closes
the TCP connection may have been cut off (a truncation attack, or a crash). Both reach the
handler as ``eof_received``; ``conn.tls_close_notify_received`` tells them apart.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from typing import Any

from portside.engine.connection import CloseReason, Connection, State
from portside.errors import ConnectionClosedError

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


class TlsConnection(Connection):
    """A connection whose bytes are TLS records; handlers see plaintext only.

    ``conn.tls`` is the ``ssl.SSLObject`` (``selected_alpn_protocol()``, ``version()``,
    ``cipher()``, ``getpeercert()``), and ``conn.tls_server_name`` the SNI name asked for.
    ``conn.tls_close_notify_received`` is True once the peer ended its side cleanly with a
    TLS close_notify; at ``eof_received`` or ``connection_closed``, False means the peer (or
    something between) closed the TCP connection without it: the data may be truncated.
    """

    __slots__ = ("_handshaken", "_incoming", "_outgoing", "tls", "tls_close_notify_received",
                 "tls_server_name")

    def attach(self, core: Any, listener: Any, sock: Any, peer_address: Any,
               pending: bool) -> None:
        context = listener.config.tls
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self.tls_server_name: str | None = None
        self.tls_close_notify_received = False
        self._handshaken = False
        # TLS is always pending at first: its handshake must finish before anything is handed
        # over, and the first-data deadline covers it. (Connection.attach, not super(): the
        # compiled engine borrows these methods for a class that does not derive from this one.)
        Connection.attach(self, core, listener, sock, peer_address, pending=True)

    def handle_read(self) -> None:
        # The plain read path, up to the handler, as in Connection.handle_read (which keeps
        # it inline for speed); then the bytes go to TLS instead of to the handler.
        state = self._state
        if state >= State.CLOSING:
            if state == State.LINGERING:
                self._discard_until_eof()
            return
        pool = self._core.buffers
        buffer = pool.acquire()
        try:
            received = self._sock.recv_into(buffer)
        except (BlockingIOError, InterruptedError):
            pool.release(buffer)
            return
        except OSError as exc:
            pool.release(buffer)
            self._socket_failed(exc)
            return
        if not received:
            pool.release(buffer)
            self._peer_eof()
            return
        listener = self.listener
        if not self.bytes_in:
            listener.record_first_byte(self._core.reactor.time() - self.accepted_at)
        self.bytes_in += received
        if self._idle is not None:
            self._idle.start(self)
        view = memoryview(buffer)[:received]
        try:
            if (state == State.PENDING and listener.proxy_protocol is not None
                    and self.proxy is None):
                rest = self._take_proxy_header(view)  # the header comes in clear, before TLS
                if rest is None:
                    return  # incomplete (wait) or refused (closed)
                self._incoming.write(rest)
            else:
                self._incoming.write(view)
        finally:
            view.release()
            pool.release(buffer)
        if self._state == State.CLOSED:
            return
        if not self._handshaken and not self._handshake():
            return
        self._read_plaintext()
        self._flush_tls()

    def _handshake(self) -> bool:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush_tls()
            return False
        except (ssl.SSLError, OSError) as exc:
            listener = self.listener
            listener.tls_failures += 1
            listener.log.log("tls-handshake", logging.INFO,
                             f"{{count}} more TLS handshakes failed on {listener.address}",
                             "TLS handshake with %r on %s failed: %s", self.peer_address,
                             listener.address, exc)
            self._flush_tls()  # the alert, if any, so the client learns why...
            self.close_for(CloseReason.TLS_ERROR)  # ...sent before the FIN, not lost to a RST
            return False
        self._handshaken = True
        self.tls_server_name = getattr(self.tls, _SNI_ATTRIBUTE, None)
        self._flush_tls()
        listener = self.listener
        if not listener.data_first and self.proxy_satisfied():
            listener.became_active(self)
            self.establish(None)
        return self._state != State.CLOSED

    def proxy_satisfied(self) -> bool:
        return self.listener.proxy_protocol is None or self.proxy is not None

    def _read_plaintext(self) -> None:
        pool = self._core.buffers
        while self._state in (State.PENDING, State.OPEN):
            buffer = pool.acquire()
            try:
                size = self.tls.read(len(buffer), buffer)
            except ssl.SSLWantReadError:
                pool.release(buffer)
                return
            except ssl.SSLZeroReturnError:  # the peer's close_notify: a clean end of stream
                pool.release(buffer)
                self.tls_close_notify_received = True
                self._peer_eof()
                return
            except ssl.SSLError as exc:
                pool.release(buffer)
                listener = self.listener
                listener.tls_failures += 1
                listener.log.log("tls-error", logging.INFO,
                                 f"closed {{count}} more connections on {listener.address} "
                                 "for bad TLS records",
                                 "TLS error from %r on %s: %s", self.peer_address,
                                 listener.address, exc)
                self._abort(CloseReason.TLS_ERROR)
                return
            if not size:  # read() returns 0 (not raising) once the peer's close_notify came
                pool.release(buffer)
                self.tls_close_notify_received = True
                self._peer_eof()
                return
            data = memoryview(buffer)[:size]
            try:
                if self._state == State.PENDING:  # data-first: these are the first bytes
                    self.listener.became_active(self)
                    try:
                        self.establish(data)
                    except Exception as exc:
                        self._handler_failed(exc)
                else:
                    self._deliver(data, State.OPEN)
            finally:
                data.release()
                pool.release(buffer)

    def _flush_tls(self) -> None:
        pending = self._outgoing.pending
        if pending and self._state != State.CLOSED:
            self._send_bytes(self._outgoing.read())

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and queue ``data``; see ``Connection.write``."""
        if self._state != State.OPEN:
            if (self.close_reason in (CloseReason.CLOSED, CloseReason.ABORTED)
                    or self._state == State.PENDING):
                raise ConnectionClosedError(f"connection {self.id} is closed")
            return
        if self._corked is not None:
            self._corked.append(bytes(data))
        elif data:
            self.tls.write(data)
            self._flush_tls()

    def _begin_close(self, reason: CloseReason) -> None:
        """Every graceful close (the handler's, a timeout's, shutdown's) sends close_notify
        before the FIN, so the peer can tell the end from a truncation."""
        if self._state >= State.CLOSING:
            return
        if self._corked is not None:
            self.uncork()
        if self._state == State.OPEN and self._handshaken:
            # SSLWantReadError just means the peer's close_notify has not come: not waited for.
            with contextlib.suppress(ssl.SSLError, OSError):
                self.tls.unwrap()
            self._flush_tls()
        Connection._begin_close(self, reason)
