"""What the listeners and connections of one server share: loop, default handler, pools, and
the count of live connections (the connections themselves are the reactor's registrations: a
set of them too would cost some 50 bytes per idle connection at 10,000).

Several servers may run on one loop (``IOPool``): each has its own core (its handler, settings,
count of live connections and idle callback) over the same reactor and the same ``Pools``, so
connections are told apart by their core, never by the loop they are registered with."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from portside.config import ListenerConfig, ServerConfig, address_label
from portside.engine.buffers import BufferPool, ObjectPool
from portside.engine.connection import Connection
from portside.engine.outbound import DEFAULT_OUTBOUND, Connector
from portside.engine.reactor import Reactor
from portside.errors import ErrorOrigin
from portside.handler import report_error

if TYPE_CHECKING:
    from collections.abc import Callable

    from portside.handler import Handler

logger = logging.getLogger("portside")
connection_logger = logging.getLogger("portside.connections")


class Pools:
    """The read buffers and connection objects of one engine (one loop), however many servers
    it runs: made from the engine's ``ServerConfig``."""

    def __init__(self, config: ServerConfig, compiled: bool = False) -> None:
        connection_class: type[Connection] = Connection
        kinds: tuple[type[Any], type[Any]] = (BufferPool, ObjectPool)
        if compiled:  # the same pools and classes, with compiled hot paths
            from portside.engine import compiled as native

            connection_class = native.CompiledConnection
            kinds = (native.BufferPool, native.ObjectPool)
        self.connection_class = connection_class
        self.buffers: BufferPool = kinds[0](config.buffer_size, config.buffer_pool_max_free)
        self.connection_pool: ObjectPool[Connection] = kinds[1](
            connection_class, config.connection_pool_max_free, config.connection_pool_size)


class EngineCore:
    """One server's share of an engine: counts its live connections, recycles their objects
    into the pools, and reports errors to the handler concerned."""

    def __init__(self, reactor: Reactor, handler: Handler | None, config: ServerConfig,
                 on_idle: Callable[[], None], compiled: bool = False,
                 pools: Pools | None = None) -> None:
        self.reactor = reactor
        #: The server's handler: what serves a listener whose config names none.
        self.handler = handler
        self.config = config
        pools = pools or Pools(config, compiled)
        self.buffers = pools.buffers
        self.connection_pool = pools.connection_pool
        self._connection_class = pools.connection_class
        self.open = 0  # connections between attach and close
        #: Connections that finished when none was open (a bug in portside; see
        #: connection_finished).
        self.miscounted = 0
        self._to_recycle: list[Connection] = []
        self._on_idle = on_idle  # called when the last live connection closes
        self._log_connections = config.log_connections  # off by default: one check per close
        #: Outbound connections' policies and counters, one per ListenerConfig used to connect.
        self.connectors: dict[ListenerConfig, Connector] = {}
        self._connectors_lock = threading.Lock()  # connect() may be called from any thread

    def connector(self, config: ListenerConfig | None = None) -> Connector:
        """The ``Connector`` for outbound connections under ``config``'s policies."""
        config = config or DEFAULT_OUTBOUND
        with self._connectors_lock:
            found = self.connectors.get(config)
            if found is None:
                found = self.connectors[config] = Connector(self, config)
        return found

    def close_outbound(self) -> None:
        """Shutdown: connects under way fail, and no new one starts (connections made go on
        until the server closes them with the others)."""
        for connector in list(self.connectors.values()):
            connector.close()

    def new_connection(self) -> Connection:
        """A connection object, from the pool (a TLS session is made per connection)."""
        conn = self.connection_pool.acquire()
        self.open += 1
        return conn

    def connection_finished(self, conn: Connection) -> None:
        if self.open <= 0:  # never a negative count: a drain would wait for it for ever
            self.finished_twice(conn)
            return
        self.open -= 1
        if self._log_connections:
            _log_closed(conn, self.reactor.time())
        # Recycle on the next iteration: now, the closing call chain still references it.
        if not self._to_recycle:
            self.reactor.call_soon(self._recycle)
        self._to_recycle.append(conn)
        if not self.open:
            self._on_idle()

    def finished_twice(self, conn: Connection) -> None:
        """A connection ended that was not open (closed twice, or never counted): a bug in
        portside. Logged once per server as an internal error, then only counted
        (``miscounted``); the caller leaves every count and the object's pooling alone."""
        self.miscounted += 1
        if self.miscounted == 1:
            logger.error("internal error: %r ended twice (closed and counted once; later "
                         "ones are only counted in miscounted)", conn)

    def live(self) -> list[Connection]:
        """This server's open connections, pending ones included: every connection is
        registered with the loop from accept to close (a shared loop holds other servers')."""
        kind = self._connection_class
        return [target for target in self.reactor.targets()
                if isinstance(target, kind) and target._core is self]

    def _recycle(self) -> None:
        pending, self._to_recycle = self._to_recycle, []
        while pending:
            conn = pending.pop()
            self.connection_pool.recycle(conn)
            del conn

    def report_error(self, conn: Connection | None, exc: BaseException,
                     origin: ErrorOrigin = ErrorOrigin.CALLBACK,
                     handler: Handler | None = None) -> None:
        """Tell the handler concerned once (the connection's, else ``handler``, else the
        server's), with where the error came from; if its ``error`` callback raises too, log
        both."""
        if conn is not None:
            handler = conn._handler
        if handler is None:
            handler = self.handler
        if handler is None:
            logger.error("error (%s): %r", origin.value, exc, exc_info=exc)
            return
        try:
            report_error(handler, conn, exc, origin)
        except Exception:
            logger.exception("handler.error raised while reporting %r", exc)


def _log_closed(conn: Connection, now: float) -> None:
    """The per-connection line (``log_connections``): who, where, how long, how much, why."""
    peer = address_label(conn.peer_address)
    reason = conn.close_reason.value if conn.close_reason is not None else "closed"
    connection_logger.info("closed peer=%s listener=%s duration=%.3f bytes_in=%d bytes_out=%d "
                           "reason=%s", peer or "-", conn.listener.config.label,
                           now - conn.accepted_at, conn.bytes_in, conn.bytes_out, reason)
