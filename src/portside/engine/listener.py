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
import errno
import ipaddress
import logging
import os
import socket
import stat
from typing import TYPE_CHECKING, NoReturn

from portside.config import AcceptPolicy, ListenerConfig
from portside.engine.admission import ClientAdmission, Refusal, describe_key
from portside.engine.connection import _LINGER_RST, CloseReason, Connection, State
from portside.engine.lograte import LogLimiter
from portside.engine.timeouts import TimeoutTracker
from portside.engine.tls import remember_server_names
from portside.errors import ConfigError, ListenError
from portside.protocols.proxy import Version as ProxyVersion
from portside.statistics import TTFB_BUCKETS, ListenerStatistics

if TYPE_CHECKING:
    from portside.engine.core import EngineCore
    from portside.engine.reactor import TimerHandle
    from portside.handler import Handler

logger = logging.getLogger("portside")

# Errors that mean "out of a resource right now": retry later, never spin and never die.
_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Errors about one connection that died in the backlog: skip it and accept the next.
_SKIP_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN,
                          errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH,
                          errno.EOPNOTSUPP, errno.ENETUNREACH})
_SHUTDOWN_ACCEPT_LIMIT = 4096  # connections taken from the backlog at shutdown to close cleanly
# How often a connection under a read-silence deadline is looked at, per read_timeout: the
# deadline fires after between read_timeout and (1 + 1/_SILENCE_LOOKS) read_timeout of silence.
_SILENCE_LOOKS = 4

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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
            # The kernel keeps silent connections to itself for about this long (see README).
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
        #: The PROXY header versions expected first, or None when the listener takes none.
        self.proxy_protocol = (config.proxy_protocol
                               if config.proxy_protocol is not ProxyVersion.OFF else None)
        # Connections wait as pending until their first bytes (data-first) or their PROXY
        # header has arrived, under the same first-data deadline.
        self.starts_pending = (self.data_first or self.proxy_protocol is not None
                               or config.tls is not None)
        self.first_data = self.tracker_class(config.first_data_timeout, self._first_data_expired)
        self.pending = self.first_data.queue
        # The optional timeouts: None when off, so the hot path pays one attribute test.
        self.idle = self._optional(config.idle_timeout, CloseReason.IDLE_TIMEOUT, abort=False)
        self.read = self._optional(config.read_timeout, CloseReason.READ_TIMEOUT, abort=False)
        self.write = self._optional(config.write_timeout, CloseReason.WRITE_TIMEOUT, abort=True)
        #: read_timeout for connections whose handler never says what the peer owes (see
        #: ``Connection.awaiting_data``): looked at a few times per timeout, not on every read.
        self.silence = self.tracker_class(config.read_timeout / _SILENCE_LOOKS,
                                      self._silence_check) if config.read_timeout else None
        #: The timeouts in force, made once: every closing connection is taken out of each.
        self.trackers = tuple(tracker for tracker in (self.first_data, self.idle, self.read,
                                                      self.write, self.silence)
                              if tracker is not None)
        self.accepted = self.closed = 0
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
        self._pressure_timer: TimerHandle | None = None
        #: The port the kernel bound (the chosen one when 0 was asked for); 0 for Unix sockets.
        self.port = int(sock.getsockname()[1]) if self.is_tcp else 0
        #: Where it listens, as logs and statistics show it.
        self.address = f"unix:{config.path}" if config.path is not None else \
            _peer_label(sock.getsockname())

    # -- wiring ----------------------------------------------------------------------------------

    def _optional(self, timeout: float, reason: CloseReason,
                  abort: bool) -> TimeoutTracker | None:
        if not timeout:
            return None

        def expire(conn: Connection) -> bool:
            if not abort and conn._state >= State.CLOSING:
                return False  # closing already (say, flushing): not counted a second time
            self.log.log(reason.value, logging.INFO,
                         f"closed {{count}} more connections on {self.address}: "
                         f"{reason.value} after {timeout:g} s",
                         "closed %s on %s: %s after %g s", _peer_label(conn.peer_address),
                         self.address, reason.value, timeout)
            if abort:  # the peer is not reading: a graceful close would wait on it forever
                conn.abort_for(reason)
            else:
                conn.close_for(reason)
            return True

        return self.tracker_class(timeout, expire)

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
        assert self.read is not None
        self.read.expired += 1  # one read_timeouts figure, whichever way it ran
        self.log.log("read-silence", logging.INFO,
                     f"closed {{count}} more connections on {self.address}: no bytes for "
                     f"{self.config.read_timeout:g} s (read-timeout)",
                     "closed %s on %s: no bytes for %g s (read-timeout)",
                     _peer_label(conn.peer_address), self.address, self.config.read_timeout)
        conn.close_for(CloseReason.READ_TIMEOUT)
        return False

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
        if self._at_ceiling and self.pending_count + self.active_count < value:
            self._at_ceiling = False
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
        return "at-ceiling" if self._at_ceiling else "accepting"

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
        core.reactor.register(self.fd, self, readable=False, writable=False)
        self._update_watch()

    def pause(self) -> None:
        self.paused = True
        self._update_watch()

    def resume(self) -> None:
        self.paused = False
        self._update_watch()

    def _update_watch(self) -> None:
        if self._core is None or self._closed:
            return
        watch = not (self.paused or self._backing_off or self._at_ceiling or self._broken)
        if watch != self._watching:
            self._watching = watch
            self._core.reactor.modify(self.fd, readable=watch, writable=False)

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
            if exc.errno in _SKIP_ERRNOS:
                return True
            if exc.errno in _CAPACITY_ERRNOS:
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
                     "header", _peer_label(peer), self.address)
        self.accepted += 1
        self.closed += 1
        self.proxy_refused += 1
        reason = CloseReason.REFUSED.value
        self.closed_by_reason[reason] = self.closed_by_reason.get(reason, 0) + 1
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
        self.accepted += 1
        self.closed += 1
        reason = CloseReason.CLIENT_LIMIT.value
        self.closed_by_reason[reason] = self.closed_by_reason.get(reason, 0) + 1
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        sock.close()

    def _count_client_refusal(self, peer: object, refusal: Refusal) -> None:
        self.client_refused += 1
        self.log.log("client-limit", logging.WARNING,
                     f"refused {{count}} more connections on {self.address} over a per-client "
                     "limit",
                     "refused %s on %s: over %s", _peer_label(peer), self.address,
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
        if self.is_tcp:
            # Request/response protocols must not wait 40 ms for Nagle's algorithm.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.accepted += 1
        conn = core.new_connection()
        conn.attach(core, self, sock, peer, pending=self.starts_pending)
        if self.idle is not None:
            self.idle.start(conn)
        if self.starts_pending:
            self.pending_count += 1
            self.first_data.start(conn)
        else:
            self.active_count += 1
            conn.establish(None)
        if self.pending_count + self.active_count > self.peak_connections:
            self.peak_connections = self.pending_count + self.active_count

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
            self._at_ceiling = False  # watch the socket: readable means a client is waiting
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
        self.closed += 1
        reason = conn.close_reason.value if conn.close_reason is not None else "closed"
        self.closed_by_reason[reason] = self.closed_by_reason.get(reason, 0) + 1
        open_now = self.pending_count + self.active_count
        if self._at_ceiling and open_now < self._max_connections:
            self._at_ceiling = False
            self._update_watch()

    def _first_data_expired(self, conn: Connection) -> None:
        timeout = self.config.first_data_timeout
        self.log.log("first-data-timeout", logging.INFO,
                     f"closed {{count}} more silent connections on {self.address} "
                     f"({self.config.policy.value}): no data within {timeout:g} s",
                     "closed %s on %s: no data within %g s", _peer_label(conn.peer_address),
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
                conn.attach(core, self, sock, peer, pending=True)
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

    def statistics(self) -> ListenerStatistics:
        core = self._core
        live = [conn for conn in core.live() if conn.listener is self] if core else []
        return ListenerStatistics(
            name=self.config.label, address=self.address,
            policy=self.config.policy.value, accepting=self._watching,
            accept_state=self.accept_state, max_connections=self._max_connections,
            peak_connections=self.peak_connections,
            accepted=self.accepted, pending=self.pending_count, active=self.active_count,
            closed=self.closed, first_data_timeouts=self.first_data_timeouts,
            evicted=self.evicted, limited=self.limited, accept_errors=self.accept_errors,
            proxy_errors=self.proxy_errors, tls_failures=self.tls_failures,
            proxy_refused=self.proxy_refused, client_refused=self.client_refused,
            clients_tracked=self.admission.tracked if self.admission is not None else 0,
            idle_timeouts=self.idle.expired if self.idle else 0,
            read_timeouts=self.read.expired if self.read else 0,
            write_timeouts=self.write.expired if self.write else 0,
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


def _peer_label(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer) or "unix peer"


