"""Outbound connections: ``connect`` on a running engine, its deadline, and what an outbound
connection has in place of a listener.

Theory of operation. ``Connector.connect`` starts an ``Attempt``: a non-blocking socket
whose ``connect(2)`` is under way, registered with the reactor for writability with the attempt
itself as the target, so the connection's read and write paths never see a socket that is still
connecting (on every engine, the compiled one included). Writable means the handshake ended and
``SO_ERROR`` says how. On success the socket is handed to a pooled ``Connection``
(``Connection.attach``, given the handler), which from then on is like an accepted one:
``connection_made(conn, None)``, pooled reads, the write queue and its water marks, the close
states and exactly one ``connection_closed``. A failure (refused, unreachable) tries the next
resolved address while the deadline allows; when none is left, or the deadline passes, or the
attempt is cancelled, or the server shuts down, the handler's ``connect_failed(attempt, exc)``
is called. Every attempt ends with exactly one of ``connection_made`` and ``connect_failed``,
never both, never neither.

With TLS (``tls``, or the config's client context), the connected socket goes to a pending
``Connection`` whose handler is still the attempt's ``_Handshaking`` stand-in: its bytes go to
a client-side ``TlsSession`` (``engine/tls.py``), the same one listeners use, and the attempt
stays "connecting", its deadline running, until the handshake is done. Only then is the
handler switched and ``connection_made`` called; a failed handshake (a bad certificate, a
wrong host name, the peer closing) or the deadline ends the attempt in ``connect_failed``
with the SSL error (``strerror`` a plain sentence), and the connection closes unseen.
``preamble`` goes out in the clear before the ClientHello (a PROXY header, as HAProxy's
``send-proxy`` on an ``ssl`` server line).

A host name is resolved off the loop (``getaddrinfo`` blocks), on a small thread pool; a numeric
address is used as it is. The deadline (``timeout``) covers the resolution and every address.

``conn.listener`` of an outbound connection is its ``Connector``, a ``ConnectionOwner``
(``engine/owner.py``) as listeners are: the per-connection policies (write water marks,
``write_limit``, idle and write timeouts, taken from a ``ListenerConfig`` whose listening fields
do not apply) and the counters of ``OutboundStatistics``. ``Attempt`` implements the public
``portside.ConnectAttempt`` protocol (``connection.py``).
"""

from __future__ import annotations

import bisect
import concurrent.futures
import errno
import logging
import os
import socket
import ssl
import threading
from typing import TYPE_CHECKING, Any

from portside.config import ListenerConfig, format_host_port
from portside.engine.connection import CloseReason, Connection
from portside.engine.listener import SocketOption, socket_options
from portside.engine.lograte import LogLimiter
from portside.engine.states import State, count_close
from portside.engine.timeouts import TimeoutTracker, closing_tracker
from portside.engine.tls import TlsSession, check_context, failure_reason
from portside.errors import ConfigError
from portside.handler import Handler as _Handler
from portside.statistics import TTFB_BUCKETS, OutboundStatistics

if TYPE_CHECKING:
    from portside.engine.core import EngineCore
    from portside.engine.reactor import TimerHandle
    from portside.handler import Handler

logger = logging.getLogger("portside")

#: What an outbound connection's policies come from unless the caller gives its own.
DEFAULT_OUTBOUND = ListenerConfig(name="outbound")
DEFAULT_CONNECT_TIMEOUT = 10.0  # seconds; HAProxy's examples use 5 s, Netty 30 s
_RESOLVERS = 4  # threads resolving host names, at most


class Attempt:
    """One ``connect`` under way: the handle ``Server.connect`` returns (handlers see it as
    the public ``portside.ConnectAttempt``).

    ``state`` is "connecting", then "connected" (``connection`` is the ``Connection``, which the
    handler met in ``connection_made``) or "failed" (``error`` says why; the handler was told
    in ``connect_failed``). ``user_data`` is given to the connection before ``connection_made``.
    Methods must be called on the server's loop.
    """

    __slots__ = ("_addresses", "_connector", "_deadline", "_handshaking", "_sock", "address",
                 "connection", "error", "handler", "host", "port", "preamble",
                 "server_hostname", "started_at", "state", "timeout", "tls", "user_data")

    def __init__(self, connector: Connector, handler: Handler, host: str | None, port: int,
                 path: str | None, timeout: float, user_data: Any,
                 tls: ssl.SSLContext | bool | None = None, server_hostname: str | None = None,
                 preamble: bytes = b"") -> None:
        if not 0 < timeout < float("inf"):
            raise ConfigError(f"connect timeout must be a positive number of seconds, not "
                              f"{timeout!r}")
        if tls is None or tls is False:
            tls = connector.tls
        elif tls is True:
            tls = ssl.create_default_context()
        #: The client-side context the connection speaks TLS with; None: plain TCP.
        self.tls: ssl.SSLContext | None = None if tls is None else \
            check_context(tls, False, "connect(tls=...)")
        if self.tls is not None and server_hostname is None:
            server_hostname = host  # SNI and the name checked: the host connected to
        if self.tls is not None and self.tls.check_hostname and not server_hostname:
            raise ConfigError("a TLS connect to a Unix socket needs server_hostname: the "
                              "context checks the server's name (check_hostname)")
        self.server_hostname = server_hostname if self.tls is not None else None
        self.preamble = bytes(preamble)
        self._handshaking: Connection | None = None
        self._connector = connector
        self.handler = handler
        self.host = host
        self.port = port
        self.timeout = timeout
        self.user_data = user_data
        #: Where it connects, as logs show it: ``host:port`` or ``unix:path``.
        self.address = f"unix:{path}" if path is not None else format_host_port(str(host), port)
        self.state = "connecting"
        self.connection: Connection | None = None
        self.error: OSError | None = None
        self.started_at = 0.0
        self._addresses: list[tuple[int, Any]] = (
            [(socket.AF_UNIX, path)] if path is not None else [])
        self._sock: socket.socket | None = None
        self._deadline: TimerHandle | None = None

    # -- on the loop -----------------------------------------------------------------------------

    def _start(self) -> None:
        if self.state != "connecting":
            return  # cancelled before it began
        connector = self._connector
        reactor = connector.core.reactor
        self.started_at = reactor.time()
        if connector.is_closed:
            self._fail(ConnectionAbortedError(errno.ECONNABORTED,
                                              "the server is shutting down"))
            return
        connector.attempts.add(self)
        self._deadline = reactor.call_later(self.timeout, self._timed_out)
        if self._addresses:  # a Unix path
            self._next()
            return
        assert self.host is not None
        try:  # a numeric address needs no resolver (and no thread)
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)
        except socket.gaierror:
            connector.resolve(self)
            return
        self._resolved(infos)

    def _resolved(self, infos: list[tuple[Any, ...]] | OSError) -> None:
        """The resolver's answer (on the loop): the addresses to try, in order, or its error."""
        if self.state != "connecting":
            return  # timed out or cancelled while the name was being resolved
        if isinstance(infos, OSError):
            self._fail(infos)
            return
        self._addresses = [(info[0], info[4]) for info in infos]
        self._next()

    def _next(self, last: OSError | None = None) -> None:
        """Try the next address; when none is left, fail with the last error."""
        while self._addresses:
            family, address = self._addresses.pop(0)
            try:  # out of descriptors (EMFILE), a path too long for a Unix socket: next
                sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                                     | socket.SOCK_CLOEXEC)
            except OSError as exc:
                last = exc
                continue
            try:
                # The config's socket options, as on an accepted socket; before connect(), so
                # the buffer sizes count in the window the handshake offers.
                if family != socket.AF_UNIX:
                    if self._connector.config.tcp_nodelay:
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    options = self._connector.tcp_options
                else:
                    options = self._connector.unix_options
                for level, name, value in options:
                    sock.setsockopt(level, name, value)
                code = sock.connect_ex(address)
            except OSError as exc:
                sock.close()
                last = exc
                continue
            if code == 0:
                self._sock = sock
                self._connected()
                return
            if code == errno.EINPROGRESS:
                self._sock = sock
                self._connector.core.reactor.register(sock.fileno(), self, readable=False,
                                                      writable=True)
                return
            sock.close()  # failed at once (a Unix socket's full backlog is EAGAIN: failed too)
            last = OSError(code, os.strerror(code))
        self._fail(last or OSError(errno.EADDRNOTAVAIL, "no address to connect to"))

    def handle_write(self) -> None:
        """The handshake ended (or failed): ``SO_ERROR`` says which."""
        sock = self._sock
        if sock is None or self.state != "connecting":
            return
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code == 0:
            self._connector.core.reactor.unregister(sock.fileno())
            self._connected()
            return
        self._drop_socket()
        self._next(OSError(code, os.strerror(code)))

    handle_read = handle_write  # never watched for reading; an error event means the same

    def _connected(self) -> None:
        sock, self._sock = self._sock, None
        assert sock is not None
        connector = self._connector
        core = connector.core
        conn = core.new_connection()
        try:
            peer = sock.getpeername()
        except OSError:
            peer = self.address
        tls = self.tls
        conn.attach(core, connector, sock, peer, pending=False,
                    handler=self.handler if tls is None else _Handshaking(self))
        conn.user_data = self.user_data
        if self.preamble:
            conn._send_bytes(self.preamble)  # in the clear, before any TLS record
        if tls is not None:
            # Pending until the handshake is done, as on a TLS listener (its layers are
            # not the listener's: a client-side session, made here).
            conn._state = State.PENDING
            self._handshaking = conn
            session = TlsSession(tls, False, self.server_hostname,
                                 done=lambda conn, exc: self._handshake_done(conn, exc))
            conn._tls = session
            conn._receiver = type(conn)._receive_tls
            session.start(conn)
            return
        self._made(conn)

    def _handshake_done(self, conn: Connection, exc: BaseException | None) -> None:
        """The TLS handshake ended: the connection is the handler's now, or the attempt
        fails (the connection then closes, unseen by the handler)."""
        self._handshaking = None
        if self.state != "connecting":
            return
        if exc is not None:
            if isinstance(exc, OSError):
                exc.strerror = failure_reason(exc)
            else:
                exc = OSError(failure_reason(exc))
            self._fail(exc)
            return
        conn._use_handler(self.handler)
        self._made(conn)

    def _made(self, conn: Connection) -> None:
        connector = self._connector
        core = connector.core
        self.connection = conn  # before the state says so: other threads may look
        self._end("connected")
        connector.connected += 1
        connector.active_count += 1
        connector.record_connect(core.reactor.time() - self.started_at)
        if connector.idle_tracker is not None:
            connector.idle_tracker.start(conn)
        conn.establish(None)

    def _timed_out(self) -> None:
        self._deadline = None
        if self.state == "connecting":
            self._connector.timeouts += 1
            conn = self._handshaking
            why = "" if conn is None else " (connected, but the TLS handshake did not complete)"
            self._fail(TimeoutError(errno.ETIMEDOUT, f"timed out after {self.timeout:g} s{why}"))

    @property
    def log(self) -> LogLimiter:
        """Rate-limited log lines for what happens to attempts like this one (a few lines per
        kind and a summary, as for clients): a flood of failures cannot flood the log."""
        return self._connector.log

    def cancel(self) -> None:
        """Give up (the handler still hears ``connect_failed``, with ConnectionAbortedError)."""
        if self.state == "connecting":
            self._fail(ConnectionAbortedError(errno.ECONNABORTED, "cancelled"))

    def _drop_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            self._connector.core.reactor.unregister(sock.fileno(), closing=True)
            sock.close()

    def _end(self, state: str) -> None:
        self.state = state
        self._connector.attempts.discard(self)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _fail(self, exc: OSError) -> None:
        self._drop_socket()
        self._end("failed")
        conn, self._handshaking = self._handshaking, None
        if conn is not None:  # the handshake was under way: reset, its handler unseen
            conn.abort_for(CloseReason.TLS_ERROR)
        self.error = exc
        connector = self._connector
        connector.failed += 1
        try:
            self.handler.connect_failed(self, exc)
        except Exception as raised:  # reported to the attempt's own handler, like a callback
            connector.core.report_error(None, raised, handler=self.handler)

    def __repr__(self) -> str:
        return f"<Attempt {self.address} {self.state}>"


class _Handshaking(_Handler):
    """The handler of an outbound connection while its TLS handshake is under way: the
    attempt's own handler has not met the connection, so it hears nothing of its end but
    ``connect_failed``."""

    def __init__(self, attempt: Attempt) -> None:
        self.attempt = attempt

    def connection_closed(self, conn: Any, reason: CloseReason) -> None:
        attempt = self.attempt
        attempt._handshaking = None
        if attempt.state == "connecting":
            attempt._fail(ConnectionResetError(
                errno.ECONNRESET, f"the connection ended during the TLS handshake "
                f"({reason.value})"))

    def error(self, conn: Any, exc: BaseException) -> None:
        self.attempt._connector.core.report_error(None, exc, handler=self.attempt.handler)


class Connector:
    """Outbound connections of one engine under one ``ListenerConfig``'s policies: makes the
    attempts, and is what their connections report to (``conn.listener``)."""

    # A ConnectionOwner's policies that never apply outbound: never pending, never behind a
    # balancer, no read deadline (read_timeout is a listener's), no per-client limits.
    data_first = False
    proxy_protocol = None
    silence: TimeoutTracker | None = None
    read_tracker: TimeoutTracker | None = None
    admission = None
    port = 0  #: no port of its own (ListenerView.port)

    def __init__(self, core: EngineCore, config: ListenerConfig) -> None:
        #: The config's client-side context: connections speak TLS unless told otherwise.
        self.tls = None if config.tls is None else check_context(
            config.tls, False, f"outbound config {config.label!r} (its tls)")
        self.core = core
        self.config = config
        self.address = config.label
        self.log = LogLimiter(logger, core.reactor.time, core.reactor.call_later)
        self.idle_tracker = self._optional(config.idle_timeout, CloseReason.IDLE_TIMEOUT,
                                           abort=False)
        self.write_tracker = self._optional(config.write_timeout, CloseReason.WRITE_TIMEOUT,
                                            abort=True)
        self.trackers = tuple(tracker for tracker in (self.idle_tracker, self.write_tracker)
                              if tracker is not None)
        #: What is set on each socket besides TCP_NODELAY (rcvbuf, sndbuf, keepalive, ...).
        self.tcp_options: tuple[SocketOption, ...] = socket_options(config, tcp=True)
        self.unix_options: tuple[SocketOption, ...] = socket_options(config, tcp=False)
        self.attempts: set[Attempt] = set()
        #: Shut down: new attempts fail at once.
        self.is_closed = False
        self.connected = self.failed = self.timeouts = 0
        self.active_count = self.closed_count = 0
        self.bytes_in = self.bytes_out = 0
        self.closed_by_reason: dict[str, int] = {}
        self.connect_buckets = [0] * len(TTFB_BUCKETS)
        self.connect_sum = 0.0
        self.tls_failures = self.proxy_errors = 0  # never counted: no TLS, no PROXY header
        self._resolver: concurrent.futures.ThreadPoolExecutor | None = None
        # Held by a resolver thread while it hands its answer to the loop, and by close():
        # after close() no thread touches the reactor, which may be closed (its wake-up
        # descriptor number reused) once the server has stopped.
        self._resolver_lock = threading.Lock()

    def _optional(self, timeout: float, reason: CloseReason,
                  abort: bool) -> TimeoutTracker | None:
        tracker = closing_tracker(timeout, reason, abort)
        if tracker is not None:
            tracker.attach(self.core.reactor)
        return tracker

    # -- attempts --------------------------------------------------------------------------------

    def connect(self, handler: Handler, host: str | None, port: int, path: str | None,
                timeout: float, user_data: Any, tls: ssl.SSLContext | bool | None = None,
                server_hostname: str | None = None, preamble: bytes = b"") -> Attempt:
        """Start connecting on the loop's next iteration (from any thread), so that no
        callback runs before the caller has the handle; see ``Server.connect``."""
        attempt = Attempt(self, handler, host, port, path, timeout, user_data, tls,
                                 server_hostname, preamble)
        reactor = self.core.reactor
        if reactor.in_loop_thread():
            reactor.call_soon(attempt._start)
        else:
            reactor.call_soon_threadsafe(attempt._start)
        return attempt

    def resolve(self, attempt: Attempt) -> None:
        """Resolve ``attempt``'s host name on a resolver thread; the answer comes back on the
        loop (``call_soon_threadsafe``). A late answer is ignored by the attempt."""
        if self._resolver is None:
            self._resolver = concurrent.futures.ThreadPoolExecutor(
                _RESOLVERS, thread_name_prefix="portside-resolve")
        reactor = self.core.reactor
        host, port = attempt.host, attempt.port

        def work() -> None:
            try:
                result: Any = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                result = exc
            with self._resolver_lock:
                if self._resolver is not None:
                    reactor.call_soon_threadsafe(lambda: attempt._resolved(result))

        self._resolver.submit(work)

    def close(self) -> None:
        """Shutdown: attempts under way fail (``connect_failed``), new ones fail at once.
        Connections already made are closed with the server's others."""
        self.is_closed = True
        for attempt in list(self.attempts):
            attempt._fail(ConnectionAbortedError(errno.ECONNABORTED,
                                                 "the server is shutting down"))
        with self._resolver_lock:
            resolver, self._resolver = self._resolver, None
        if resolver is not None:
            resolver.shutdown(wait=False, cancel_futures=True)
        self.log.flush()

    # -- what the connections report (the ConnectionOwner protocol) -------------------------------

    @property
    def label(self) -> str:
        return self.config.label

    def admit_client(self, conn: Connection) -> bool:
        """Never asked: outbound connections have no PROXY header (``admission`` is None)."""
        return True

    def record_connect(self, seconds: float) -> None:
        self.connect_sum += seconds
        self.connect_buckets[bisect.bisect_left(TTFB_BUCKETS, seconds)] += 1

    def record_first_byte(self, seconds: float) -> None:
        """Outbound connections' first bytes are not timed (the handshake is: record_connect)."""

    def became_active(self, conn: Connection) -> None:  # pending only in a TLS handshake
        pass

    def connection_finished(self, conn: Connection, was_pending: bool) -> None:
        self.bytes_in += conn.bytes_in
        self.bytes_out += conn.bytes_out
        for tracker in self.trackers:
            tracker.stop(conn)
        if was_pending:  # its TLS handshake failed: never connected, never counted active
            return
        self.active_count -= 1
        self.closed_count += 1
        count_close(self.closed_by_reason, conn.close_reason)

    def statistics(self) -> OutboundStatistics:
        live = [conn for conn in self.core.live() if conn.listener is self]
        return OutboundStatistics(
            name=self.config.label, connecting=len(self.attempts), active=self.active_count,
            connected=self.connected, connect_failed=self.failed,
            connect_timeouts=self.timeouts, closed=self.closed_count,
            idle_timeouts=self.idle_tracker.expired if self.idle_tracker else 0,
            write_timeouts=self.write_tracker.expired if self.write_tracker else 0,
            bytes_in=self.bytes_in + sum(conn.bytes_in for conn in live),
            bytes_out=self.bytes_out + sum(conn.bytes_out for conn in live),
            closed_by_reason=dict(self.closed_by_reason),
            connect_buckets=tuple(self.connect_buckets), connect_sum=self.connect_sum,
            connect_count=sum(self.connect_buckets))
