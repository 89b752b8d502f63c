"""What the listeners and connections of one engine run share: loop, handler, pools, and the
count of live connections (the connections themselves are the reactor's registrations: a set
of them too would cost some 50 bytes per idle connection at 10,000)."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from portside.config import ListenerConfig, ServerConfig
from portside.engine.buffers import BufferPool, ObjectPool
from portside.engine.connection import Connection
from portside.engine.outbound import DEFAULT_OUTBOUND, Connector
from portside.engine.reactor import Reactor

if TYPE_CHECKING:
    from collections.abc import Callable

    from portside.handler import Handler

logger = logging.getLogger("portside")
connection_logger = logging.getLogger("portside.connections")


class EngineCore:
    """Owns the pools and counts live connections; recycles connection objects."""

    def __init__(self, reactor: Reactor, handler: Handler, config: ServerConfig,
                 on_idle: Callable[[], None], compiled: bool = False) -> None:
        self.reactor = reactor
        self.handler = handler
        self.config = config
        connection_class: type[Connection] = Connection
        pools: tuple[type[Any], type[Any]] = (BufferPool, ObjectPool)
        if compiled:  # the same pools and classes, with compiled hot paths
            from portside.engine import compiled as native

            connection_class = native.CompiledConnection
            pools = (native.BufferPool, native.ObjectPool)
        self.buffers: BufferPool = pools[0](config.buffer_size, config.buffer_pool_max_free)
        self.connections: ObjectPool[Connection] = pools[1](
            connection_class, config.connection_pool_max_free, config.connection_pool_size)
        self._connection_class = connection_class
        self.open = 0  # connections between attach and close
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
        conn = self.connections.acquire()
        self.open += 1
        return conn

    def connection_finished(self, conn: Connection) -> None:
        self.open -= 1
        if self._log_connections:
            _log_closed(conn, self.reactor.time())
        # Recycle on the next iteration: now, the closing call chain still references it.
        if not self._to_recycle:
            self.reactor.call_soon(self._recycle)
        self._to_recycle.append(conn)
        if not self.open:
            self._on_idle()

    def live(self) -> list[Connection]:
        """The open connections, pending ones included: every connection is registered with
        the loop from accept to close."""
        kind = self._connection_class
        return [target for target in self.reactor.targets() if isinstance(target, kind)]

    def _recycle(self) -> None:
        pending, self._to_recycle = self._to_recycle, []
        while pending:
            conn = pending.pop()
            self.connections.recycle(conn)
            del conn

    def report_error(self, conn: Connection | None, exc: BaseException) -> None:
        """Tell the handler once (the connection's own: an outbound one may have its own);
        if its ``error`` callback raises too, log both."""
        handler = conn._handler if conn is not None else self.handler
        try:
            handler.error(conn, exc)
        except Exception:
            logger.exception("handler.error raised while reporting %r", exc)


def _log_closed(conn: Connection, now: float) -> None:
    """The per-connection line (``log_connections``): who, where, how long, how much, why."""
    peer = conn.peer_address
    if isinstance(peer, tuple):
        host, port = peer[:2]
        peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    reason = conn.close_reason.value if conn.close_reason is not None else "closed"
    connection_logger.info("closed peer=%s listener=%s duration=%.3f bytes_in=%d bytes_out=%d "
                           "reason=%s", peer or "-", conn.listener.config.label,
                           now - conn.accepted_at, conn.bytes_in, conn.bytes_out, reason)
