"""The accept loop of one listening socket: policies, batching, admission and overload backoff.

Theory of operation. The listening socket is watched for readability only while accepting is
allowed: not paused by the user, not at ``max_connections``, and not backing off after a
capacity error. Each wake-up accepts up to ``accept_batch`` connections (the seed's accepts
posted in advance); the kernel's backlog holds the rest. EMFILE, ENFILE, ENOBUFS and ENOMEM stop
accepting for ``accept_backoff`` seconds instead of spinning on a socket that stays readable.
Errors about one connection that died in the backlog skip it. Any other error means the
listening socket itself is broken (or portside is): as trio does, it is logged and raised, and
the listener stops watching its socket first, so the loop cannot spin on it.
Data-first connections wait in a ``DeadlineQueue`` until their first bytes; one timer sweeps
the silent ones (the seed's SO_CONNECT_TIME check). At the ceiling, pending connections that
have been silent for ``stale_pending_age`` are closed first, so a flood of silent connections
cannot hold every slot against real clients (the seed's reaction to FD_ACCEPT).
``_update_watch`` is the one place that decides whether the socket is watched, so it is also
where the handler hears ``accepting_stopped`` / ``accepting_started``, once per change.

Shaping. Each accepted socket gets the listener's socket options (``tcp_nodelay``,
``so_keepalive``, ``tcp_user_timeout``, ``rcvbuf``, ``sndbuf``; see ``socket_options``), then,
if the handler overrides it, ``Handler.socket_accepted`` sees it before a byte is read.

Trust. On a PROXY-protocol listener the header names the client, so only a balancer may send
one: a TCP peer outside ``trusted_proxies`` is refused at accept, before a byte is read (an RST,
no connection object, and the handler never hears of it), counted in ``proxy_refused`` and in
``closed_by_reason["refused"]``. Unix-socket peers are always trusted. Log lines about what
clients do (timeouts, refusals, bad headers, failed handshakes) go through one ``LogLimiter``
per listener, so a flood leaves a few lines and a summary while the counters count everything.

Admission per client (``admission.py``). With a per-client limit on, each TCP connection is
checked against its client's counts at accept, right after the trust check and before a byte
is read; a refused one is reset like an untrusted PROXY source, counted in ``client_refused``
and ``closed_by_reason["client-limit"]``. On a PROXY-protocol listener the client is the one the
header names, so the check waits for the header (``Connection._take_proxy_header``). Either way
the place a connection holds is given back in ``connection_finished``, the one exit every
connection passes, keyed by its descriptor.
"""

from __future__ import annotations

import _socket
import bisect
import contextlib
import ipaddress
import logging
import os
import socket
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from portside.config import AcceptPolicy, ListenerConfig, address_label, parse_keepalive
from portside.engine.admission import ClientAdmission, Refusal, describe_key
from portside.engine.connection import _LINGER_RST, CloseReason, Connection, State
from portside.engine.lograte import LogLimiter
from portside.engine.states import CAPACITY_ERRNOS, SKIP_ERRNOS, count_close
from portside.engine.timeouts import TimeoutTracker, closing_tracker
from portside.engine.tls import remember_server_names
from portside.errors import ConfigError, ErrorOrigin, ListenError
from portside.handler import Handler
from portside.protocols.proxy import Version as ProxyVersion
from portside.reasons import AcceptingReason
from portside.statistics import TTFB_BUCKETS, ListenerStatistics

if TYPE_CHECKING:
    from portside.engine.core import EngineCore
    from portside.engine.reactor import TimerHandle
    from portside.handler import Handler

logger = logging.getLogger("portside")

_SHUTDOWN_ACCEPT_LIMIT = 4096  # connections taken from the backlog at shutdown to close cleanly
# How often a connection under a read-silence deadline is looked at, per read_timeout: the
# deadline fires after between read_timeout and (1 + 1/_SILENCE_LOOKS) read_timeout of silence.
_SILENCE_LOOKS = 4

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
SocketOption = tuple[int, int, int]  # (level, name, value) for setsockopt


_STARTED_AFTER = {AcceptingReason.PAUSED: AcceptingReason.RESUMED,
                  AcceptingReason.CEILING: AcceptingReason.BELOW_CEILING,
                  AcceptingReason.BACKOFF: AcceptingReason.BACKOFF_OVER}
#: The settings that mean nothing on a Unix socket, with their defaults.
_TCP_ONLY = {"tcp_nodelay": True, "so_keepalive": "off", "tcp_user_timeout": 0.0}


def socket_options(config: ListenerConfig, tcp: bool) -> tuple[SocketOption, ...]:
    """The options set on each accepted socket besides TCP_NODELAY; empty at the defaults, so
    they cost nothing then. Keepalive and the user timeout apply to TCP only; the buffer
    sizes to Unix sockets too. Values were checked when configured, within the kernel's own
    limits, so setsockopt takes them."""
    options: list[SocketOption] = []
    keepalive = parse_keepalive(config.so_keepalive) if tcp else None
    if keepalive is not None:
        options.append((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1))
        for name, value in zip((socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT),
                               keepalive, strict=True):
            if value:  # 0: the kernel's default (net.ipv4.tcp_keepalive_*)
                options.append((socket.IPPROTO_TCP, name, value))
    if tcp and config.tcp_user_timeout:
        options.append((socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                        max(1, round(config.tcp_user_timeout * 1000))))
    if config.rcvbuf:
        options.append((socket.SOL_SOCKET, socket.SO_RCVBUF, config.rcvbuf))
    if config.sndbuf:
        options.append((socket.SOL_SOCKET, socket.SO_SNDBUF, config.sndbuf))
    return tuple(options)


def bind_listener(config: ListenerConfig) -> socket.socket:
    """Create, configure, bind and listen; errors become one clear ``ListenError``."""
    if config.path is not None:
        return _bind_unix(config)
    try:
        infos = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {config.description}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        # Lets a restarted server bind while old connections sit in TIME_WAIT; a live listener
        # on the same port still makes bind fail, which is what "port in use" should mean.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if config.policy is AcceptPolicy.DATA_FIRST and config.defer_accept and \
                hasattr(socket, "TCP_DEFER_ACCEPT"):
            # The kernel keeps silent connections to itself for about this long (docs/listeners.md).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, config.defer_accept)
        sock.bind(address)
        sock.listen(config.backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {config.description}: {_describe(exc)}") from None
    return sock


def _bind_unix(config: ListenerConfig) -> socket.socket:
    path = config.path
    assert path is not None
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise ListenError(f"cannot listen on unix:{path}: a file that is not a socket is there")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # a stale socket left by a server that is gone
        else:
            raise ListenError(f"cannot listen on unix:{path}: another server is listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(config.backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on unix:{path}: {_describe(exc)}") from None
    return sock


def _describe(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()


class Listener:
    """Accepts connections for one ``ListenerConfig`` and counts what happens to them."""

    #: What keeps each kind of deadline (the compiled engine has its own).
    tracker_class: type[TimeoutTracker] = TimeoutTracker
    #: The handler that serves this listener's connections: ``config.handler``, else the
    #: server's (set by ``attach``).
    handler: Handler

    def __init__(self, config: ListenerConfig, sock: socket.socket, owned: bool = True) -> None:
        self.config = config
        self.sock = sock
        #: False when other processes share this socket (workers): closing it then neither
        #: takes their backlog nor removes a Unix socket's file.
        self.owned = owned
        self.fd = sock.fileno()
        self.is_tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        self._family, self._type, self._proto = sock.family, sock.type, sock.proto
        self.data_first = config.policy is AcceptPolicy.DATA_FIRST
        #: TCP_NODELAY on each accepted socket (TCP, unless tcp_nodelay is off), and the other
        #: options set on each (see ``socket_options``).
        self.nodelay = self.is_tcp and config.tcp_nodelay
        self.socket_options = socket_options(config, self.is_tcp)
        #: ``Handler.socket_accepted``, when the handler overrides it (set at ``attach``).
        self._socket_hook: Callable[[Listener, socket.socket], None] | None = None
        #: The PROXY header versions expected first, or None when the listener takes none.
        self.proxy_protocol = (config.proxy_protocol
                               if config.proxy_protocol is not ProxyVersion.OFF else None)
        # Connections wait as pending until their first bytes (data-first) or their PROXY
        # header has arrived, under the same first-data deadline.
        self.starts_pending = (self.data_first or self.proxy_protocol is not None
                               or config.tls is not None)
        self.first_data = self.tracker_class(config.first_data_timeout, self._first_data_expired)
        self.pending = self.first_data.queue
        #: The optional timeouts' trackers: None when off, so the hot path pays one attribute
        #: test (each one's ``expired`` is the statistics' idle/read/write_timeouts).
        self.idle_tracker = self._optional(config.idle_timeout, CloseReason.IDLE_TIMEOUT,
                                           abort=False)
        self.read_tracker = self._optional(config.read_timeout, CloseReason.READ_TIMEOUT,
                                           abort=False)
        self.write_tracker = self._optional(config.write_timeout, CloseReason.WRITE_TIMEOUT,
                                            abort=True)
        #: read_timeout for connections whose handler never says what the peer owes (see
        #: ``Connection.awaiting_data``): looked at a few times per timeout, not on every read.
        self.silence = self.tracker_class(config.read_timeout / _SILENCE_LOOKS,
                                      self._silence_check) if config.read_timeout else None
        #: The timeouts in force, made once: every closing connection is taken out of each.
        self.trackers = tuple(tracker for tracker in (self.first_data, self.idle_tracker,
                                                      self.read_tracker, self.write_tracker,
                                                      self.silence)
                              if tracker is not None)
        #: Connections accepted, and closed (by reason: ``closed_by_reason``); counts.
        self.accepted = self.closed_count = 0
        self.evicted = self.limited = self.accept_errors = self.proxy_errors = 0
        self.tls_failures = self.proxy_refused = self.client_refused = 0
        #: Rate-limited log lines about clients (timeouts, refusals, bad headers, handshakes).
        self.log = LogLimiter(logger)
        #: The networks allowed to send a PROXY header; None when nothing is checked (no PROXY
        #: protocol, or a Unix socket, whose peers are always trusted).
        self.trusted: tuple[Network, ...] | None = None
        if self.proxy_protocol is not None and self.is_tcp:
            self.trusted = tuple(ipaddress.ip_network(network, strict=False)
                                 for network in config.trusted_proxies)
        self.closed_by_reason: dict[str, int] = {}
        #: The per-client limits (None when off); checked at accept unless a PROXY header
        #: will name the client (then by the connection, once the header is parsed).
        self.admission = ClientAdmission.for_listener(config)
        self._admit_at_accept = (self.admission is not None and self.is_tcp
                                 and self.proxy_protocol is None)
        if self.admission is not None:
            self.admission.on_full = self._client_table_full
            if not self.is_tcp and self.proxy_protocol is None:  # an inherited Unix socket
                logger.warning("%s is a Unix socket without the PROXY protocol: its clients "
                               "have no address, so the per-client limits do nothing there",
                               config.description)
        if config.tls is not None:
            remember_server_names(config.tls)
        self.bytes_in = self.bytes_out = 0
        self.ttfb_buckets = [0] * len(TTFB_BUCKETS)
        self.ttfb_sum = 0.0
        self.pending_count = self.active_count = 0
        self.peak_connections = 0
        self._max_connections = config.max_connections
        self.paused = False
        self._core: EngineCore | None = None
        self._backing_off = False
        self._at_ceiling = False
        self._broken = False
        self._closed = False
        self._watching = False
        #: Whether the handler was last told accepting started (see ``_update_watch``); why it
        #: stopped; whether it ever started; and whether the socket is watched at the ceiling
        #: only to see if a client waits behind silent pending connections (``_recheck_ceiling``).
        self._accepting = self._ever_accepted = self._probing = False
        self._stopped_by: AcceptingReason | None = None
        self._pressure_timer: TimerHandle | None = None
        #: The port the kernel bound (the chosen one when 0 was asked for); 0 for Unix sockets.
        self.port = int(sock.getsockname()[1]) if self.is_tcp else 0
        #: Where it listens, as logs and statistics show it.
        self.address = f"unix:{config.path}" if config.path is not None else \
            address_label(sock.getsockname())

    # -- wiring ----------------------------------------------------------------------------------

    def _optional(self, timeout: float, reason: CloseReason,
                  abort: bool) -> TimeoutTracker | None:
        def announce(conn: Connection) -> None:
            self.log.log(reason.value, logging.INFO,
                         f"closed {{count}} more connections on {self.address}: "
                         f"{reason.value} after {timeout:g} s",
                         "closed %s on %s: %s after %g s", address_label(conn.peer_address),
                         self.address, reason.value, timeout)

        return closing_tracker(timeout, reason, abort, self.tracker_class, announce)

    def _silence_check(self, conn: Connection) -> bool:
        """A connection under the read-silence deadline, looked at: closed once it has sent
        nothing for ``_SILENCE_LOOKS`` looks in a row; otherwise looked at again later."""
        if conn._state >= State.CLOSING:
            return False  # its end is under way: nothing to look at any more
        if conn.bytes_in != conn._read_mark:
            conn._read_mark = conn.bytes_in
            conn._silent_looks = 0
        else:
            conn._silent_looks += 1
        if conn._silent_looks < _SILENCE_LOOKS:
            assert self.silence is not None
            self.silence.start(conn)
            return False
        assert self.read_tracker is not None
        self.read_tracker.expired += 1  # one read_timeouts figure, whichever way it ran
        self.log.log("read-silence", logging.INFO,
                     f"closed {{count}} more connections on {self.address}: no bytes for "
                     f"{self.config.read_timeout:g} s (read-timeout)",
                     "closed %s on %s: no bytes for %g s (read-timeout)",
                     address_label(conn.peer_address), self.address, self.config.read_timeout)
        conn.close_for(CloseReason.READ_TIMEOUT)
        return False

    @property
    def label(self) -> str:
        """The config's name, else its address (``ListenerView.label``)."""
        return self.config.label

    @property
    def first_data_timeouts(self) -> int:
        return self.first_data.expired

    @property
    def max_connections(self) -> int:
        """The ceiling in force: ``config.max_connections``, or what an operator set since."""
        return self._max_connections

    @max_connections.setter
    def max_connections(self, value: int) -> None:
        self._max_connections = value
        if (self._at_ceiling or self._probing) and self.pending_count + self.active_count < value:
            self._at_ceiling = self._probing = False
            self._update_watch()

    @property
    def accept_state(self) -> str:
        """"accepting", "paused", "at-ceiling", "backing-off" or "closed"."""
        if self._closed:
            return "closed"
        if self.paused:
            return "paused"
        if self._backing_off:
            return "backing-off"
        return "at-ceiling" if self._at_ceiling or self._probing else "accepting"

    def attach(self, core: EngineCore) -> None:
        handler = self.config.handler if self.config.handler is not None else core.handler
        if handler is None or isinstance(handler, str):
            raise ConfigError(f"{self.address} has no handler to serve it" + (
                f" ({handler!r} is to be imported first: see workers.app)" if handler else ""))
        self.handler = handler
        self._core = core
        self.log.clock = core.reactor.time
        self.log.schedule = core.reactor.call_later
        if self.admission is not None:
            self.admission.clock = core.reactor.time
        for tracker in self.trackers:
            tracker.attach(core.reactor)
        if self.trusted == ():
            logger.warning("%s expects a PROXY header but trusted_proxies is empty: every TCP "
                           "connection will be refused", self.address)
        if not self.is_tcp:
            ignored = [name for name, default in _TCP_ONLY.items()
                       if getattr(self.config, name) != default]
            if ignored:
                logger.warning("%s is not a TCP socket: %s ignored there", self.address,
                               ", ".join(ignored))
        if getattr(type(handler), "socket_accepted", None) is not Handler.socket_accepted or \
                "socket_accepted" in getattr(handler, "__dict__", {}):
            self._socket_hook = handler.socket_accepted
        core.reactor.register(self.fd, self, readable=False, writable=False)
        self._update_watch()

    def pause(self) -> None:
        self.paused = True
        self._update_watch()

    def resume(self) -> None:
        self.paused = False
        self._update_watch()

    def _stop_reason(self) -> AcceptingReason | None:
        """Why the listener does not accept now (the most lasting reason first), or None."""
        if self._closed:
            return AcceptingReason.SHUTDOWN
        if self._broken:
            return AcceptingReason.ERROR
        if self.paused:
            return AcceptingReason.PAUSED
        if self._backing_off:
            return AcceptingReason.BACKOFF
        if self._at_ceiling or self._probing:
            return AcceptingReason.CEILING
        return None

    def _update_watch(self) -> None:
        """The one place that decides whether the socket is watched: called after every
        change of the flags above, it tells the handler when accepting stops or starts."""
        core = self._core
        if core is None:
            return
        stopped = self._stop_reason()
        if not self._closed:
            # At the ceiling the socket may be watched without accepting: a probe for a client
            # waiting behind stale pending connections (see _recheck_ceiling).
            watch = stopped is None or (self._probing and stopped is AcceptingReason.CEILING)
            if watch != self._watching:
                self._watching = watch
                core.reactor.modify(self.fd, readable=watch, writable=False)
        previous, self._stopped_by = self._stopped_by, stopped
        if (stopped is None) == self._accepting:
            return
        # Recorded before the callback, which may pause or resume (and so come back here).
        self._accepting = stopped is None
        if stopped is None:
            reason = AcceptingReason.START
            if self._ever_accepted and previous is not None:
                reason = _STARTED_AFTER.get(previous, reason)
            self._ever_accepted = True
            callback = self.handler.accepting_started
        else:
            reason = stopped
            callback = self.handler.accepting_stopped
        try:
            callback(self, reason)
        except Exception as exc:
            core.report_error(None, exc, ErrorOrigin.CALLBACK, handler=self.handler)

    # -- the accept loop -------------------------------------------------------------------------

    def handle_read(self) -> None:
        limit = self._max_connections
        for _ in range(self.config.accept_batch):
            if self._closed:
                return  # a handler shut the server down from connection_made
            if self.pending_count + self.active_count >= limit:
                self._reach_ceiling()
                if self._at_ceiling:
                    return
            if not self._accept_one():
                return

    def handle_write(self) -> None:  # listeners are never watched for writing
        pass

    def _accept_one(self) -> bool:
        """Accept and admit one connection; False when the loop should stop for now."""
        try:
            sock, peer = self._accept()
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self.accept_errors += 1
            if exc.errno in SKIP_ERRNOS:
                return True
            if exc.errno in CAPACITY_ERRNOS:
                self._back_off(exc)
                return False
            self._accept_broken(exc)
        if self.trusted is not None and not _trusted(peer, self.trusted):
            self._refuse(sock, peer)
            return True
        if self._admit_at_accept and not self._check_client(sock, peer):
            return True
        self._admit(sock, peer)
        return True

    def _accept_broken(self, exc: OSError) -> NoReturn:
        """accept() failed for no reason listed: log, stop watching, raise (as trio does)."""
        self._broken = True  # stop watching first: the socket stays readable
        self._update_watch()
        logger.error("accept on %s failed unexpectedly (%s); this listener stops "
                     "accepting", self.address, _describe(exc))
        raise exc

    def _refuse(self, sock: _socket.socket, peer: object) -> None:
        """An untrusted peer on a PROXY-protocol listener: reset before reading anything
        (counted and logged first, so whoever sees the reset sees them too)."""
        self.log.log("proxy-refused", logging.WARNING,
                     f"refused {{count}} more connections on {self.address} from sources "
                     "not in trusted_proxies",
                     "refused %s on %s: not in trusted_proxies, so it may not send a PROXY "
                     "header", address_label(peer), self.address)
        self.proxy_refused += 1
        self._reset_at_accept(sock, CloseReason.REFUSED)

    def _reset_at_accept(self, sock: _socket.socket, reason: CloseReason,
                         fd: int | None = None) -> None:
        """A connection refused before a byte is read: counted as accepted and closed for
        ``reason``, then reset (RST), never made a connection object. Its place in its
        client's count, if the per-client limits gave it one at accept (a socket hook runs
        after them), is given back: ``fd`` is its descriptor when ``sock`` may be closed."""
        self.accepted += 1
        self.closed_count += 1
        count_close(self.closed_by_reason, reason)
        if self.admission is not None:
            self.admission.release(sock.fileno() if fd is None else fd)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        sock.close()

    def _check_client(self, sock: _socket.socket, peer: object) -> bool:
        """The per-client limits, at accept: True if admitted, else it is refused."""
        assert self.admission is not None
        refusal = self.admission.admit_text(sock.fileno(), peer[0])  # type: ignore[index]
        if refusal is None:
            return True
        self._refuse_client(sock, peer, refusal)
        return False

    def admit_client(self, conn: Connection) -> bool:
        """The per-client limits, once a PROXY header has named ``conn``'s client: True if
        admitted; else it is counted and logged, and the caller resets it."""
        assert self.admission is not None
        refusal = self.admission.admit_text(conn._fd, conn.peer_address[0])
        if refusal is None:
            return True
        self._count_client_refusal(conn.peer_address, refusal)
        return False

    def _refuse_client(self, sock: _socket.socket, peer: object, refusal: Refusal) -> None:
        """Over a per-client limit at accept: reset before reading anything, as ``_refuse``."""
        self._count_client_refusal(peer, refusal)
        self._reset_at_accept(sock, CloseReason.CLIENT_LIMIT)

    def _count_client_refusal(self, peer: object, refusal: Refusal) -> None:
        self.client_refused += 1
        self.log.log("client-limit", logging.WARNING,
                     f"refused {{count}} more connections on {self.address} over a per-client "
                     "limit",
                     "refused %s on %s: over %s", address_label(peer), self.address,
                     refusal.value)

    def _client_table_full(self, key: bytes) -> None:
        self.log.log("client-table-full", logging.WARNING,
                     f"admitted {{count}} more clients untracked on {self.address}: the "
                     "per-client table is full",
                     "admitted %s on %s untracked: client_table_size=%d clients all hold open "
                     "connections (make it at least max_connections)", describe_key(key),
                     self.address, self.config.client_table_size)

    def _accept(self) -> tuple[_socket.socket, object]:
        """accept(), wrapping the descriptor in the C socket type rather than socket.socket:
        the Python subclass adds nothing a connection uses but ~56 bytes and GC tracking on
        every connection (``socket.socket.accept`` is ``_accept`` plus that wrapping)."""
        fd, peer = self.sock._accept()  # type: ignore[attr-defined]
        try:
            return _socket.socket(self._family, self._type, self._proto, fileno=fd), peer
        except OSError:
            os.close(fd)
            raise

    def _admit(self, sock: _socket.socket, peer: object) -> None:
        core = self._core
        assert core is not None
        sock.setblocking(False)
        if self.nodelay:
            # Request/response protocols must not wait 40 ms for Nagle's algorithm.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for level, name, value in self.socket_options:
            with contextlib.suppress(OSError):  # as in C: checked values; a dead peer's fails
                sock.setsockopt(level, name, value)
        if self._socket_hook is not None and not self._run_socket_hook(sock.fileno(), peer):
            sock.detach()  # closed (reset) by _run_socket_hook
            return
        self.accepted += 1
        conn = core.new_connection()
        conn.attach(core, self, sock, peer, pending=self.starts_pending, handler=self.handler)
        if self.idle_tracker is not None:
            self.idle_tracker.start(conn)
        if self.starts_pending:
            self.pending_count += 1
            self.first_data.start(conn)
        else:
            self.active_count += 1
            conn.establish(None)
        if self.pending_count + self.active_count > self.peak_connections:
            self.peak_connections = self.pending_count + self.active_count

    def _run_socket_hook(self, fd: int, peer: object) -> bool:
        """``Handler.socket_accepted`` on a socket object over ``fd``, detached afterwards so
        the connection keeps the descriptor. False when the hook raised (or closed the
        socket): then the connection was reset here, counted, and reported with origin
        ``socket-hook``; it never reaches the handler otherwise (no ``connection_closed``)."""
        hook = self._socket_hook
        core = self._core
        assert hook is not None and core is not None
        sock = socket.socket(self._family, self._type, self._proto, fileno=fd)
        sock.setblocking(False)  # as the descriptor is: the object would say blocking
        failure: Exception | None = None
        try:
            hook(self, sock)
        except Exception as exc:
            failure = exc
        if sock.fileno() == fd and failure is None:
            sock.detach()
            return True
        if failure is None:  # the hook closed the descriptor: that was not its to close
            failure = RuntimeError("socket_accepted closed the accepted socket")
        self._reset_at_accept(sock, CloseReason.HANDLER_ERROR, fd)  # a closed one: no-op
        core.report_error(None, failure, ErrorOrigin.SOCKET_HOOK, handler=self.handler)
        return False

    def _back_off(self, exc: OSError) -> None:
        core = self._core
        assert core is not None
        self.log.log("accept-failed", logging.WARNING,
                     f"accept on {self.address} failed {{count}} more times",
                     "accept on %s failed (%s); pausing accepts for %.2f s",
                     self.address, _describe(exc), core.config.accept_backoff)
        self._backing_off = True
        self._update_watch()

        def retry() -> None:
            self._backing_off = False
            self._update_watch()

        core.reactor.call_later(core.config.accept_backoff, retry)

    def _reach_ceiling(self) -> None:
        """At the ceiling with a client waiting: make room from stale pending connections, or
        stop accepting until a connection closes or the oldest pending one turns stale."""
        core = self._core
        assert core is not None
        now = core.reactor.time()
        stale = self.pending.pop_older_than(self.config.stale_pending_age, now)
        for conn in stale:
            self.evicted += 1
            conn.abort_for(CloseReason.EVICTED)
        at_ceiling = self.pending_count + self.active_count >= self._max_connections
        if at_ceiling and not self._at_ceiling and not stale:
            self.limited += 1
            self.log.log("ceiling", logging.INFO,
                         f"{self.address} reached max_connections {{count}} more times",
                         "%s reached max_connections=%d; accepting paused",
                         self.address, self._max_connections)
        self._at_ceiling = at_ceiling
        self._probing = False
        due = self.pending.next_due()
        if at_ceiling and due is not None and self._pressure_timer is None:
            # Look at the backlog again once the oldest pending connection has been silent
            # for stale_pending_age: a client waiting there then makes us evict it (the seed's
            # FD_ACCEPT check); with nobody waiting, the silent connection may stay.
            stale_at = due - self.pending.timeout + self.config.stale_pending_age
            self._pressure_timer = core.reactor.call_later(stale_at - now, self._recheck_ceiling)
        self._update_watch()

    def _recheck_ceiling(self) -> None:
        self._pressure_timer = None
        if self._at_ceiling:
            # Watch the socket (a probe, still at the ceiling): readable means a client is
            # waiting, and handle_read's _reach_ceiling then evicts a stale connection for it.
            self._at_ceiling = False
            self._probing = True
            self._update_watch()

    # -- connection bookkeeping ------------------------------------------------------------------

    def record_first_byte(self, seconds: float) -> None:
        """A connection's first byte came ``seconds`` after its accept (a histogram)."""
        self.ttfb_sum += seconds
        self.ttfb_buckets[bisect.bisect_left(TTFB_BUCKETS, seconds)] += 1

    def became_active(self, conn: Connection) -> None:
        """A pending data-first connection sent its first bytes."""
        self.first_data.stop(conn)
        self.pending_count -= 1
        self.active_count += 1

    def connection_finished(self, conn: Connection, was_pending: bool) -> None:
        # Byte counts live on the connections while they are open (one add per read, not two)
        # and are folded into the listener's when they close.
        self.bytes_in += conn.bytes_in
        self.bytes_out += conn.bytes_out
        for tracker in self.trackers:
            tracker.stop(conn)
        if self.admission is not None:
            self.admission.release(conn._fd)
        if was_pending:
            self.pending_count -= 1
        else:
            self.active_count -= 1
        self.closed_count += 1
        count_close(self.closed_by_reason, conn.close_reason)
        open_now = self.pending_count + self.active_count
        if (self._at_ceiling or self._probing) and open_now < self._max_connections:
            self._at_ceiling = self._probing = False
            self._update_watch()

    def _first_data_expired(self, conn: Connection) -> None:
        timeout = self.config.first_data_timeout
        self.log.log("first-data-timeout", logging.INFO,
                     f"closed {{count}} more silent connections on {self.address} "
                     f"({self.config.policy.value}): no data within {timeout:g} s",
                     "closed %s on %s: no data within %g s", address_label(conn.peer_address),
                     self.address, timeout)
        conn.abort_for(CloseReason.FIRST_DATA_TIMEOUT)

    # -- shutdown --------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop listening. Connections already completed in the backlog are accepted first, as
        pending connections, so the server's shutdown closes them cleanly (it closes every
        pending connection) instead of the kernel resetting them."""
        self.log.flush()  # the summaries of a flood still under way (again at the very end)
        if self._closed:
            return
        core = self._core
        if core is not None:
            for _ in range(_SHUTDOWN_ACCEPT_LIMIT if self.owned else 0):
                try:
                    sock, peer = self._accept()
                except OSError:
                    break
                self.accepted += 1
                sock.setblocking(False)
                conn = core.new_connection()
                conn.attach(core, self, sock, peer, pending=True, handler=self.handler)
                self.pending_count += 1
            core.reactor.unregister(self.fd)
            if self._pressure_timer is not None:
                self._pressure_timer.cancel()
                self._pressure_timer = None
        self._closed = True
        self._watching = False
        self.sock.close()
        if self.config.path is not None and self.owned:
            with contextlib.suppress(OSError):
                os.unlink(self.config.path)
        self._update_watch()  # accepting_stopped(SHUTDOWN), if it was accepting

    def statistics(self) -> ListenerStatistics:
        core = self._core
        live = [conn for conn in core.live() if conn.listener is self] if core else []
        return ListenerStatistics(
            name=self.config.label, address=self.address,
            policy=self.config.policy.value, accepting=self._accepting,
            accept_state=self.accept_state, max_connections=self._max_connections,
            peak_connections=self.peak_connections,
            accepted=self.accepted, pending=self.pending_count, active=self.active_count,
            closed=self.closed_count, first_data_timeouts=self.first_data_timeouts,
            evicted=self.evicted, limited=self.limited, accept_errors=self.accept_errors,
            proxy_errors=self.proxy_errors, tls_failures=self.tls_failures,
            proxy_refused=self.proxy_refused, client_refused=self.client_refused,
            clients_tracked=self.admission.tracked if self.admission is not None else 0,
            idle_timeouts=self.idle_tracker.expired if self.idle_tracker else 0,
            read_timeouts=self.read_tracker.expired if self.read_tracker else 0,
            write_timeouts=self.write_tracker.expired if self.write_tracker else 0,
            ttfb_buckets=tuple(self.ttfb_buckets), ttfb_sum=self.ttfb_sum,
            ttfb_count=sum(self.ttfb_buckets),
            bytes_in=self.bytes_in + sum(conn.bytes_in for conn in live),
            bytes_out=self.bytes_out + sum(conn.bytes_out for conn in live),
            closed_by_reason=dict(self.closed_by_reason),
        )


def _trusted(peer: object, networks: tuple[Network, ...]) -> bool:
    """Whether a TCP peer's address is in one of ``networks`` (IPv4-mapped IPv6 counts as
    IPv4, as a dual-stack socket reports IPv4 clients)."""
    try:
        address = ipaddress.ip_address(peer[0])  # type: ignore[index]
    except (TypeError, IndexError, ValueError):
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)
