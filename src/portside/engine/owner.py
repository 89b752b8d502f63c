"""What a connection reads of, and reports to, whoever made it: a listener (accepted
connections) or an outbound ``Connector`` (``Server.connect``). Both implement
``ConnectionOwner``; the connection is typed with it, so neither poses as the other.

The policies an outbound connection has no use for are part of the protocol, answered
"none" by the connector (``data_first`` False; ``proxy_protocol``, ``silence``,
``read_tracker`` and ``admission`` None): the connection's paths test them anyway, once, where
they begin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from portside.config import ListenerConfig
    from portside.engine.admission import ClientAdmission
    from portside.engine.connection import Connection
    from portside.engine.lograte import LogLimiter
    from portside.engine.timeouts import TimeoutTracker
    from portside.protocols.proxy import Version as ProxyVersion
    from portside.statistics import ListenerStatistics, OutboundStatistics


class ConnectionOwner(Protocol):
    """A connection's owner (``conn.listener``): its policies, its log, its counters."""

    # Read-only to a connection (properties here, plain attributes on the owners).

    @property
    def config(self) -> ListenerConfig:
        """The per-connection policies: water marks, write_limit, TLS, timeouts."""

    @property
    def address(self) -> str:
        """How log lines name it."""

    @property
    def log(self) -> LogLimiter:
        """Its rate-limited log lines about clients."""

    @property
    def idle_tracker(self) -> TimeoutTracker | None: ...

    @property
    def read_tracker(self) -> TimeoutTracker | None:
        """The read deadline's tracker; None when off (always outbound)."""

    @property
    def write_tracker(self) -> TimeoutTracker | None: ...

    @property
    def silence(self) -> TimeoutTracker | None:
        """Watches read silence for read_timeout; None when off (always outbound)."""

    @property
    def data_first(self) -> bool:
        """Connections stay pending until their first bytes (never outbound)."""

    @property
    def proxy_protocol(self) -> ProxyVersion | None:
        """The PROXY header versions expected first; None: none (never outbound)."""

    @property
    def admission(self) -> ClientAdmission | None:
        """The per-client limits; None when off (always outbound)."""

    # Counted by the connection and its TLS session.
    tls_failures: int
    proxy_errors: int

    @property
    def port(self) -> int: ...

    @property
    def label(self) -> str: ...

    def admit_client(self, conn: Connection) -> bool:
        """Behind a PROXY header: whether the client it names is within the limits."""

    def record_first_byte(self, seconds: float) -> None: ...

    def became_active(self, conn: Connection) -> None:
        """A pending connection became the handler's."""

    def connection_finished(self, conn: Connection, was_pending: bool) -> None:
        """The connection closed: count it, stop its deadlines."""

    def statistics(self) -> ListenerStatistics | OutboundStatistics: ...
