"""What the listeners and connections of one engine run share: loop, handler, pools, live set."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from portside.config import ServerConfig
from portside.engine.buffers import BufferPool, ObjectPool
from portside.engine.connection import Connection
from portside.engine.reactor import Reactor
from portside.engine.tls import TlsConnection

if TYPE_CHECKING:
    from collections.abc import Callable

    from portside.handler import Handler

logger = logging.getLogger("portside")


class EngineCore:
    """Owns the pools and the set of live connections; recycles connection objects."""

    def __init__(self, reactor: Reactor, handler: Handler, config: ServerConfig,
                 on_idle: Callable[[], None]) -> None:
        self.reactor = reactor
        self.handler = handler
        self.config = config
        self.buffers = BufferPool(config.buffer_size, config.buffer_pool_max_free)
        self.connections: ObjectPool[Connection] = ObjectPool(
            Connection, config.connection_pool_max_free, config.connection_pool_size)
        self.live: set[Connection] = set()
        self._to_recycle: list[Connection] = []
        self._on_idle = on_idle  # called when the last live connection closes

    def new_connection(self, tls: bool = False) -> Connection:
        """A connection object: pooled for plain TCP; a fresh TLS one otherwise (its handshake
        costs far more than the object, and its SSL state is not reusable)."""
        conn = TlsConnection() if tls else self.connections.acquire()
        self.live.add(conn)
        return conn

    def connection_finished(self, conn: Connection) -> None:
        self.live.discard(conn)
        if not isinstance(conn, TlsConnection):
            # Recycle on the next iteration: now, the closing call chain still references it.
            if not self._to_recycle:
                self.reactor.call_soon(self._recycle)
            self._to_recycle.append(conn)
        if not self.live:
            self._on_idle()

    def _recycle(self) -> None:
        pending, self._to_recycle = self._to_recycle, []
        while pending:
            conn = pending.pop()
            self.connections.recycle(conn)
            del conn

    def report_error(self, conn: Connection | None, exc: BaseException) -> None:
        """Tell the handler once; if its ``error`` callback raises too, log both."""
        try:
            self.handler.error(conn, exc)
        except Exception:
            logger.exception("handler.error raised while reporting %r", exc)
