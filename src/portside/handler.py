"""The class users subclass: one method per event in a server's and a connection's life.

Every callback runs on the server's loop thread, one at a time, so a handler needs no locks for
state it touches only from callbacks. A callback must not block: hand slow work elsewhere and
write the reply later (on the loop, via ``server.call_soon_threadsafe``). If a connection
callback raises, portside reports it to ``error`` once and aborts that connection only.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import weakref
from typing import TYPE_CHECKING, Any

from portside.config import address_label
from portside.errors import ErrorOrigin

if TYPE_CHECKING:
    import socket

    from portside.connection import ConnectAttempt, Connection, ListenerView
    from portside.reasons import AcceptingReason, CloseReason
    from portside.server import Server

logger = logging.getLogger("portside")


class Handler:
    """Override the callbacks your protocol needs; the defaults do the sensible minimum.

    A connection callback is looked up on the handler at each call, on every engine: one set
    on the class or the instance later (even on a running server) is called from then on.
    The compiled engine runs Handler's own defaults inline, with the same effect."""

    # -- server life cycle -----------------------------------------------------------------------

    def server_started(self, server: Server) -> None:
        """Every listener is bound and accepting. Called once, before any connection callback."""

    def shutdown_started(self, server: Server) -> None:
        """Graceful shutdown began: accepting has stopped, live connections may still finish.

        A handler may tell its clients goodbye here (``server.connections()``) or close them.
        """

    def server_stopped(self, server: Server) -> None:
        """Every connection has closed (``connection_closed`` came for each). Called once, last."""

    def accepting_stopped(self, listener: ListenerView, reason: AcceptingReason) -> None:
        """``listener`` stopped accepting: paused, at its ceiling, backing off after a
        capacity error (EMFILE...), broken, or shutting down (``reason`` says which). Called
        once per change, not again while the reason changes with accepting still stopped."""

    def accepting_started(self, listener: ListenerView, reason: AcceptingReason) -> None:
        """``listener`` accepts (again): at start, resumed, below its ceiling, or its back-off
        over (``reason`` says which). Called once per change."""

    # -- connection life cycle -------------------------------------------------------------------

    def socket_accepted(self, listener: ListenerView, sock: socket.socket) -> None:
        """A socket was accepted on ``listener``: shape it (``setsockopt``, ``getsockopt``)
        before portside uses it; the listener's socket options are already set. Do not close,
        keep or read from it. Called only when a handler overrides it (it costs a Python call
        and a socket object per accept). An exception resets this connection only, without
        ``connection_closed``, and is reported to ``error`` with origin ``socket-hook``."""

    def connection_made(self, conn: Connection, first_data: memoryview | None) -> None:
        """A connection is yours. On a data-first listener ``first_data`` holds its first bytes
        (like ``data_received``, valid only during this call); on an immediate one it is None.

        Called once per connection. The default passes ``first_data`` to ``data_received``.
        """
        if first_data is not None:
            self.data_received(conn, first_data)

    def data_received(self, conn: Connection, data: memoryview) -> None:
        """Bytes arrived, in order. ``data`` is a view of a pooled buffer that is reused once this
        returns: ``conn.write(data)`` is safe (unsent bytes are copied); to keep bytes for later,
        copy them (``bytes(data)``)."""

    def tls_established(self, conn: Connection) -> None:
        """The TLS handshake begun by ``conn.start_tls`` (STARTTLS) is done: ``conn.tls``
        has the peer's certificate and the ALPN protocol, and what was written since
        ``start_tls`` has gone out encrypted. A handshake that fails closes the connection
        instead (``connection_closed`` with ``TLS_ERROR``). Not called for listener or
        ``connect(tls=...)`` connections: they are handshaken before ``connection_made``."""

    def eof_received(self, conn: Connection) -> None:
        """The peer closed its sending side (half-close). Reading stops; writing still works.

        The default closes gracefully: pending writes are sent, then FIN. Override to keep
        writing and call ``conn.close()`` when done.
        """
        conn.close()

    def write_drained(self, conn: Connection) -> None:
        """Every byte that had to be queued has been handed to the kernel (writes the kernel took
        at once never queue, so they do not trigger this)."""

    def pause_writing(self, conn: Connection) -> None:
        """The write queue passed ``write_high_water``: portside has paused reading from this
        connection. Stop producing data for it until ``resume_writing``."""

    def resume_writing(self, conn: Connection) -> None:
        """The write queue fell to ``write_low_water``; reading has resumed."""

    def connection_reset(self, conn: Connection) -> None:
        """The peer reset the connection (RST). ``connection_closed`` follows at once."""

    def connection_closed(self, conn: Connection, reason: CloseReason) -> None:
        """The connection is gone. Called exactly once for every connection the kernel handed
        portside, pending data-first ones included (those never saw ``connection_made``:
        check ``reason``). The object may be reused afterwards: drop references to it."""

    def connect_failed(self, attempt: ConnectAttempt, exc: OSError) -> None:
        """An outbound connect (``Server.connect``) failed: refused, unreachable, timed out
        (``TimeoutError``), cancelled or cut short by shutdown (``ConnectionAbortedError``);
        with ``tls``, the handshake failed (an ``ssl.SSLError``: ``SSLCertVerificationError``
        for a bad certificate or a wrong host name; ``exc.strerror`` says it plainly, e.g.
        "certificate verify failed: self-signed certificate") or the peer closed during it.
        Called once per attempt, instead of ``connection_made``. The default logs a line
        (rate-limited: a few per interval, then a summary)."""
        attempt.log.log("connect-failed", logging.WARNING,
                        f"{{count}} more connects to {attempt.address} failed",
                        "connect to %s failed: %s", attempt.address, exc.strerror or exc)

    def error(self, conn: Connection | None, exc: BaseException) -> None:
        """A callback raised, or a socket failed unexpectedly. Called once per failure; the
        connection (if any) is then aborted. The default logs the traceback, with where the
        error came from.

        To be told where, declare a keyword-only ``origin`` in the override:
        ``def error(self, conn, exc, *, origin: ErrorOrigin = ErrorOrigin.CALLBACK)``. It is
        the handler's own code (callback, offload, socket-hook) or portside's (read, write,
        proxy-header, tls). Overrides without it keep working: portside looks once per
        override and leaves the keyword out (a type checker accepts both forms).
        """
        _log_error(conn, exc, None)


def _log_error(conn: Connection | None, exc: BaseException, origin: ErrorOrigin | None) -> None:
    where = (f"connection {conn.id} from {address_label(conn.peer_address)}"
             if conn is not None else "server")
    source = f" ({origin.value})" if origin is not None else ""
    logger.error("error%s on %s: %r", source, where, exc, exc_info=exc)


#: Whether each ``error`` function takes ``origin`` (looked at once per function).
_TAKES_ORIGIN: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def report_error(handler: Handler, conn: Connection | None, exc: BaseException,
                 origin: ErrorOrigin) -> None:
    """Call ``handler.error``, with ``origin`` if the override declares it (keyword-only, as
    ``Handler.error`` explains); overrides without it keep working, told less. Origin is a
    keyword the override opts into, rather than a parameter of ``Handler.error`` itself, so
    that existing two-argument overrides still satisfy a type checker."""
    method: Any = handler.error
    key = getattr(method, "__func__", method)
    if key is Handler.error:
        _log_error(conn, exc, origin)
        return
    try:
        takes = _TAKES_ORIGIN.get(key)
    except TypeError:  # not weakly referable (a builtin): looked at every time
        takes = None
    if takes is None:
        takes = _takes_origin(method)
        with contextlib.suppress(TypeError):
            _TAKES_ORIGIN[key] = takes
    if takes:
        method(conn, exc, origin=origin)
    else:
        method(conn, exc)


def _takes_origin(method: Any) -> bool:
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(parameter.kind is inspect.Parameter.VAR_KEYWORD or (
        parameter.name == "origin" and parameter.kind is not inspect.Parameter.POSITIONAL_ONLY)
        for parameter in parameters)
