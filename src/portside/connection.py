"""What a handler sees of a connection: a typed interface, apart from the engine's internals.

Every engine's connection class (``engine/connection.py`` and its compiled twin) has more
methods than these: the ones the engine drives it with (``attach``, ``establish``,
``handle_read``, ``close_for`` ...). Handlers are typed against ``Connection`` here, so a type
checker stops a handler reaching for those; the layers portside builds on the engine
(``MessageHandler``, ``StreamHandler``) use the slightly wider ``LayerConnection``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

if TYPE_CHECKING:
    import ssl

    from portside.config import ListenerConfig
    from portside.engine.states import CloseReason
    from portside.protocols.proxy import ProxyHeader
    from portside.statistics import ConnectionCounters, ListenerStatistics

#: A (host, port[, flowinfo, scope_id]) tuple for TCP, a path string for Unix sockets.
Address = Any


class ListenerView(Protocol):
    """The listener a connection arrived through, as a handler may see it."""

    @property
    def address(self) -> str:
        """``host:port`` or ``unix:PATH``, as logs and statistics name it."""

    @property
    def config(self) -> ListenerConfig: ...

    def statistics(self) -> ListenerStatistics: ...


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


def as_layer(conn: Connection) -> LayerConnection:
    """The engine's connection behind ``conn``, for a layer: every engine's connection class
    has these methods (tests/test_public_api.py checks it), handlers are just not given them."""
    return cast("LayerConnection", conn)
