"""What a handler sees of a connection, of a listener and of an outbound connect: typed
interfaces, apart from the engine's internals.

Every engine's connection class (``engine/connection.py`` and its compiled twin) has more
methods than these: the ones the engine drives it with (``attach``, ``establish``,
``handle_read``, ``close_for`` ...). Handlers are typed against ``Connection`` here, so a type
checker stops a handler reaching for those; the layers portside builds on the engine
(``MessageHandler``, ``StreamHandler``) use the slightly wider ``LayerConnection``. The same
holds for ``ListenerView`` (the engine's listeners and outbound connectors) and
``ConnectAttempt`` (the engine's attempt, ``engine/outbound.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

if TYPE_CHECKING:
    import ssl

    from portside.config import ListenerConfig
    from portside.handler import Handler
    from portside.protocols.proxy import ProxyHeader
    from portside.reasons import CloseReason
    from portside.statistics import ConnectionCounters, ListenerStatistics, OutboundStatistics

#: A (host, port[, flowinfo, scope_id]) tuple for TCP, a path string for Unix sockets.
Address = Any


class ListenerView(Protocol):
    """What a handler may read of a listener (``Handler.accepting_started`` and friends,
    ``Server.listeners``, ``conn.listener``). An outbound connection's ``conn.listener`` is
    its connector: the ``ListenerConfig`` whose per-connection policies it runs under (its
    listening fields do not apply), ``port`` 0, and ``OutboundStatistics``."""

    @property
    def address(self) -> str:
        """``host:port`` or ``unix:PATH``, as logs and statistics name it (for an outbound
        connector: its config's label)."""

    @property
    def port(self) -> int:
        """The port the kernel bound (the chosen one when 0 was asked for); 0 for a Unix
        socket and for an outbound connector."""

    @property
    def label(self) -> str:
        """The config's name, else its address: how statistics and ``ctl`` name it."""

    @property
    def config(self) -> ListenerConfig: ...

    def statistics(self) -> ListenerStatistics | OutboundStatistics:
        """A frozen snapshot of its counters: ``ListenerStatistics`` for a listener,
        ``OutboundStatistics`` for an outbound connector."""


class RateLimitedLog(Protocol):
    """Log lines that cannot flood the log: a few lines per kind and interval, then one
    summary line with the count of those left out."""

    def log(self, kind: str, level: int, summary: str, message: str, *args: Any) -> None:
        """Log ``message % args`` at ``level`` unless ``kind`` has used up its window; then
        count it. ``summary`` is the summary's text, ``{count}`` where the number goes."""


class Connection(Protocol):
    """One client connection, as a handler uses it: write, close, flow control, addresses.

    Resource handling: the connection object is pooled and serves another client after
    ``connection_closed``; keep ``id`` or your own data, not the object, beyond that.
    Error handling: writing to a closed connection raises ``ConnectionClosedError``.
    """

    #: Free for the handler: per-connection state of its own.
    user_data: Any

    @property
    def id(self) -> int:
        """Unique in this process: tells one life of a pooled connection from the next."""

    @property
    def listener(self) -> ListenerView: ...

    @property
    def peer_address(self) -> Address:
        """The client's address (behind a trusted PROXY header, the one the header gives)."""

    @property
    def balancer_address(self) -> Address:
        """Behind a PROXY header: the balancer's own address; None otherwise."""

    @property
    def local_address(self) -> Address: ...

    @property
    def proxy(self) -> ProxyHeader | None:
        """The PROXY header the connection began with, on a PROXY-protocol listener."""

    @property
    def accepted_at(self) -> float:
        """When it was accepted, on the engine's monotonic clock."""

    @property
    def bytes_in(self) -> int: ...

    @property
    def bytes_out(self) -> int: ...

    @property
    def close_reason(self) -> CloseReason | None: ...

    @property
    def is_open(self) -> bool: ...

    @property
    def is_pending(self) -> bool: ...

    @property
    def eof_received(self) -> bool: ...

    @property
    def reading_paused(self) -> bool: ...

    @property
    def write_buffer_size(self) -> int: ...

    @property
    def tls(self) -> ssl.SSLObject | None:
        """The TLS session (listener, ``connect(tls=...)`` or ``start_tls``): ``getpeercert()``,
        ``selected_alpn_protocol()``, ``version()``, ``cipher()``; None on plain TCP."""

    @property
    def tls_server_name(self) -> str | None:
        """SNI: the name the client asked for; on a client-side connection, the one sent."""

    @property
    def tls_close_notify_received(self) -> bool: ...

    def counters(self) -> ConnectionCounters: ...

    def write(self, data: bytes | bytearray | memoryview) -> None: ...

    def writelines(self, chunks: list[bytes | bytearray | memoryview]) -> None: ...

    def cork(self) -> None: ...

    def uncork(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def awaiting_data(self, owed: bool) -> None: ...

    def call_soon_threadsafe(self, callback: Callable[[], object]) -> None: ...

    def start_tls(self, context: ssl.SSLContext, *, server_side: bool = False,
                  server_hostname: str | None = None, unread: int = 0,
                  handshake_timeout: float | None = None) -> bool:
        """Upgrade to TLS in place (STARTTLS); ``Handler.tls_established`` follows. With
        ``unread`` plaintext bytes held past the command, refuse: close, return False."""

    def write_eof(self) -> None:
        """Half-close: send what is queued, then FIN; reading goes on."""

    def close(self) -> None: ...

    def abort(self) -> None: ...


class LayerConnection(Connection, Protocol):
    """What a layer between the engine and the handler (ordered messages, streams) also uses:
    its state slot, reading held on its own account, and closes with a reason of its own."""

    layer: Any

    def hold_reading(self, held: bool) -> None: ...

    def close_for(self, reason: CloseReason) -> None: ...

    def abort_for(self, reason: CloseReason) -> None: ...


class ConnectAttempt(Protocol):
    """One ``Server.connect`` under way: the handle it returns, and what
    ``Handler.connect_failed`` is given.

    ``state`` is "connecting", then "connected" (``connection`` is the connection the handler
    met in ``connection_made``) or "failed" (``error`` says why; the handler was told in
    ``connect_failed``). ``user_data`` is given to the connection before ``connection_made``.
    Methods must be called on the server's loop.
    """

    #: Given to the connection (``conn.user_data``) before ``connection_made``.
    user_data: Any

    @property
    def state(self) -> str:
        """"connecting", "connected" or "failed"."""

    @property
    def address(self) -> str:
        """Where it connects, as logs show it: ``host:port`` or ``unix:path``."""

    @property
    def host(self) -> str | None:
        """The host asked for; None for a Unix socket."""

    @property
    def port(self) -> int: ...

    @property
    def timeout(self) -> float:
        """Seconds for resolving, connecting and any TLS handshake, in all."""

    @property
    def handler(self) -> Handler: ...

    @property
    def tls(self) -> ssl.SSLContext | None:
        """The client-side context the connection speaks TLS with; None: plain TCP."""

    @property
    def server_hostname(self) -> str | None:
        """With TLS: the name sent as SNI and checked against the certificate."""

    @property
    def started_at(self) -> float:
        """When it began, on the engine's monotonic clock (0 until it starts on the loop)."""

    @property
    def connection(self) -> Connection | None:
        """Once "connected": the connection."""

    @property
    def error(self) -> OSError | None:
        """Once "failed": why."""

    @property
    def log(self) -> RateLimitedLog:
        """Rate-limited log lines for what happens to attempts like this one (a flood of
        failures cannot flood the log)."""

    def cancel(self) -> None:
        """Give up (the handler still hears ``connect_failed``, with ConnectionAbortedError)."""


def as_layer(conn: Connection) -> LayerConnection:
    """The engine's connection behind ``conn``, for a layer: every engine's connection class
    has these methods (tests/test_public_api.py checks it), handlers are just not given them."""
    return cast("LayerConnection", conn)
