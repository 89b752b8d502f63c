"""The accept loop of one listening socket: policies, batching, admission and overload backoff.

Theory of operation. The listening socket is watched for readability only while accepting is
allowed: not paused by the user, not at ``max_connections``, and not backing off after a
capacity error. Each wake-up accepts up to ``accept_batch`` connections (the seed's accepts
posted in advance); the kernel's backlog holds the rest. EMFILE, ENFILE, ENOBUFS and ENOMEM stop
accepting for ``accept_backoff`` seconds instead of spinning on a socket that stays readable.
Data-first connections wait in a ``DeadlineQueue`` until their first bytes; one timer sweeps
the silent ones (the seed's SO_CONNECT_TIME check). At the ceiling, pending connections that
have been silent for ``stale_pending_age`` are closed first, so a flood of silent connections
cannot hold every slot against real clients (the seed's reaction to FD_ACCEPT).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from typing import TYPE_CHECKING

from portside.config import AcceptPolicy, ListenerConfig
from portside.engine.connection import CloseReason, Connection
from portside.engine.deadlines import DeadlineQueue
from portside.errors import ListenError
from portside.statistics import ListenerStatistics

if TYPE_CHECKING:
    from portside.engine.core import EngineCore
    from portside.engine.reactor import TimerHandle

logger = logging.getLogger("portside")

# Errors that mean "out of a resource right now": retry later, never spin and never die.
_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Errors about one connection that died in the backlog: skip it and accept the next.
_SKIP_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN,
                          errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH,
                          errno.EOPNOTSUPP, errno.ENETUNREACH})
_SHUTDOWN_ACCEPT_LIMIT = 4096  # connections taken from the backlog at shutdown to close cleanly


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

    def __init__(self, config: ListenerConfig, sock: socket.socket, owned: bool = True) -> None:
        self.config = config
        self.sock = sock
        #: False when other processes share this socket (workers): closing it then neither
        #: takes their backlog nor removes a Unix socket's file.
        self.owned = owned
        self.fd = sock.fileno()
        self.is_tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        self.data_first = config.policy is AcceptPolicy.DATA_FIRST
        self.pending: DeadlineQueue[Connection] = DeadlineQueue(config.first_data_timeout)
        self.accepted = self.closed = self.first_data_timeouts = 0
        self.evicted = self.limited = self.accept_errors = 0
        self.bytes_in = self.bytes_out = 0
        self.pending_count = self.active_count = 0
        self.paused = False
        self._core: EngineCore | None = None
        self._backing_off = False
        self._at_ceiling = False
        self._closed = False
        self._watching = False
        self._sweep_timer: TimerHandle | None = None
        self._pressure_timer: TimerHandle | None = None
        #: The port the kernel bound (the chosen one when 0 was asked for); 0 for Unix sockets.
        self.port = int(sock.getsockname()[1]) if self.is_tcp else 0
        #: Where it listens, as logs and statistics show it.
        self.address = f"unix:{config.path}" if config.path is not None else \
            _peer_label(sock.getsockname())

    # -- wiring ----------------------------------------------------------------------------------

    def attach(self, core: EngineCore) -> None:
        self._core = core
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
        watch = not (self.paused or self._backing_off or self._at_ceiling)
        if watch != self._watching:
            self._watching = watch
            self._core.reactor.modify(self.fd, readable=watch, writable=False)

    # -- the accept loop -------------------------------------------------------------------------

    def handle_read(self) -> None:
        limit = self.config.max_connections
        for _ in range(self.config.accept_batch):
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
            sock, peer = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self.accept_errors += 1
            if exc.errno in _SKIP_ERRNOS:
                return True
            self._back_off(exc)
            return False
        self._admit(sock, peer)
        return True

    def _admit(self, sock: socket.socket, peer: object) -> None:
        core = self._core
        assert core is not None
        sock.setblocking(False)
        if self.is_tcp:
            # Request/response protocols must not wait 40 ms for Nagle's algorithm.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.accepted += 1
        conn = core.new_connection()
        conn.attach(core, self, sock, peer, pending=self.data_first)
        if self.data_first:
            self.pending_count += 1
            self.pending.add(conn, core.reactor.time())
            self._arm_sweep()
        else:
            self.active_count += 1
            conn.establish(None)

    def _back_off(self, exc: OSError) -> None:
        core = self._core
        assert core is not None
        logger.warning("accept on %s failed (%s); pausing accepts for %.2f s",
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
        at_ceiling = self.pending_count + self.active_count >= self.config.max_connections
        if at_ceiling and not self._at_ceiling and not stale:
            self.limited += 1
            logger.info("%s reached max_connections=%d; accepting paused",
                        self.address, self.config.max_connections)
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

    def became_active(self, conn: Connection) -> None:
        """A pending data-first connection sent its first bytes."""
        self.pending.discard(conn)
        self.pending_count -= 1
        self.active_count += 1

    def connection_finished(self, conn: Connection, was_pending: bool) -> None:
        if was_pending:
            self.pending.discard(conn)
            self.pending_count -= 1
        else:
            self.active_count -= 1
        self.closed += 1
        open_now = self.pending_count + self.active_count
        if self._at_ceiling and open_now < self.config.max_connections:
            self._at_ceiling = False
            self._update_watch()

    def _arm_sweep(self) -> None:
        core = self._core
        if self._sweep_timer is not None or core is None:
            return
        due = self.pending.next_due()
        if due is not None:
            self._sweep_timer = core.reactor.call_later(due - core.reactor.time(), self._sweep)

    def _sweep(self) -> None:
        self._sweep_timer = None
        core = self._core
        assert core is not None
        timeout = self.config.first_data_timeout
        for conn in self.pending.pop_expired(core.reactor.time()):
            self.first_data_timeouts += 1
            logger.info("closed %s on %s: no data within %g s",
                        _peer_label(conn.peer_address), self.address, timeout)
            conn.abort_for(CloseReason.FIRST_DATA_TIMEOUT)
        self._arm_sweep()

    # -- shutdown --------------------------------------------------------------------------------

    def close(self) -> list[Connection]:
        """Stop listening. Connections already completed in the backlog are accepted first and
        returned, so the caller can close them cleanly instead of the kernel resetting them."""
        if self._closed:
            return []
        core = self._core
        taken: list[Connection] = []
        if core is not None:
            for _ in range(_SHUTDOWN_ACCEPT_LIMIT if self.owned else 0):
                try:
                    sock, peer = self.sock.accept()
                except OSError:
                    break
                self.accepted += 1
                sock.setblocking(False)
                conn = core.new_connection()
                conn.attach(core, self, sock, peer, pending=True)
                self.pending_count += 1
                taken.append(conn)
            core.reactor.unregister(self.fd)
            for timer in (self._sweep_timer, self._pressure_timer):
                if timer is not None:
                    timer.cancel()
            self._sweep_timer = self._pressure_timer = None
        self._closed = True
        self._watching = False
        self.sock.close()
        if self.config.path is not None and self.owned:
            with contextlib.suppress(OSError):
                os.unlink(self.config.path)
        return taken

    def statistics(self) -> ListenerStatistics:
        return ListenerStatistics(
            name=self.config.label, address=self.address,
            policy=self.config.policy.value, accepting=self._watching,
            accepted=self.accepted, pending=self.pending_count, active=self.active_count,
            closed=self.closed, first_data_timeouts=self.first_data_timeouts,
            evicted=self.evicted, limited=self.limited, accept_errors=self.accept_errors,
            bytes_in=self.bytes_in, bytes_out=self.bytes_out,
        )


def _peer_label(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer) or "unix peer"


