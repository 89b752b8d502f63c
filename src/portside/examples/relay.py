"""A TCP relay on outbound connections: each client is forwarded to an upstream server.

Theory of operation. Each client gets a ``Pair``: its connection, the attempt and then the
connection to its upstream, and what it sent while the upstream was still connecting (held, up
to ``hold_limit`` bytes; past that, reading from the client pauses). Upstreams are tried round
robin; one that refuses or does not answer within the connect timeout is skipped for this
client and the next one is tried; when every upstream has failed, the client is closed with one
log line. Bytes flow with backpressure both ways: when one side's write queue passes
``write_high_water`` (``pause_writing``), reading from the other side pauses, and it resumes at
``write_low_water`` (``resume_writing``), so a slow reader on either side holds about high
water plus one read in the relay, never more. Half-close is carried across: one side's EOF
becomes ``write_eof`` (FIN once the queued bytes are sent) on the other, and once both
directions have ended both connections close. A reset or an error on one side aborts the other.
With ``send_proxy``, the upstream first receives a PROXY header (v1 or v2) naming the client.

The command line (``portside relay``) passes its options to every process (workers included)
in ``PORTSIDE_RELAY_*`` environment variables, which ``RelayHandler()`` reads.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

from portside import CloseReason, Connection, Handler, ListenerConfig, Server
from portside.config import address_label, format_host_port, parse_listen
from portside.engine.outbound import DEFAULT_CONNECT_TIMEOUT, ConnectAttempt
from portside.errors import ConfigError
from portside.protocols.proxy import Version, encode_header

logger = logging.getLogger("portside.relay")

UPSTREAM_ENV = "PORTSIDE_RELAY_UPSTREAM"
SEND_PROXY_ENV = "PORTSIDE_RELAY_SEND_PROXY"
CONNECT_TIMEOUT_ENV = "PORTSIDE_RELAY_CONNECT_TIMEOUT"
HOLD_LIMIT = 64 * 1024  # bytes held per client while its upstream connects
#: Close reasons after which the other side is reset rather than closed gracefully.
_ABRUPT = frozenset({CloseReason.RESET, CloseReason.ABORTED, CloseReason.HANDLER_ERROR,
                     CloseReason.SOCKET_ERROR, CloseReason.OUTPUT_LIMIT,
                     CloseReason.WRITE_TIMEOUT})


@dataclass(frozen=True)
class Upstream:
    """Where clients are forwarded: ``host``/``port``, or a Unix ``path``."""

    host: str | None
    port: int
    path: str | None

    @property
    def label(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return format_host_port(str(self.host), self.port)


def parse_upstreams(text: str) -> tuple[Upstream, ...]:
    """``HOST:PORT[,HOST:PORT...]`` (``[V6]:PORT`` and ``unix:PATH`` too)."""
    upstreams = []
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        if "@" in part:
            raise ConfigError(f"an upstream is HOST:PORT or unix:PATH, not {part!r}")
        address = parse_listen(part)
        if address.fd is not None or (address.path is None and not address.port):
            raise ConfigError(f"an upstream needs a port other than 0: {part!r}")
        upstreams.append(Upstream(address.host if address.path is None else None,
                                  address.port, address.path))
    if not upstreams:
        raise ConfigError("give at least one upstream: --upstream HOST:PORT[,HOST:PORT...]")
    return tuple(upstreams)


def parse_send_proxy(text: str) -> int:
    """``off``, ``v1`` or ``v2``: the PROXY header version sent upstream (0 for none)."""
    choices = {Version.OFF.value: 0, Version.V1.value: 1, Version.V2.value: 2}
    try:
        return choices[text.lower()]
    except KeyError:
        raise ConfigError(f"--send-proxy takes off, v1 or v2, not {text!r}") from None


def parse_connect_timeout(text: str) -> float:
    """``--connect-timeout``: seconds, a positive finite number."""
    try:
        timeout = float(text)
    except ValueError:
        timeout = -1.0
    if not 0 < timeout < float("inf"):
        raise ConfigError(f"--connect-timeout takes a positive number of seconds, not {text!r}")
    return timeout


class Pair:
    """One client and its upstream."""

    __slots__ = ("attempt", "client", "client_eof", "closed", "first", "held", "held_paused",
                 "tried", "upstream", "upstream_eof", "upstream_full")

    def __init__(self, client: Connection, first: int) -> None:
        self.client = client
        self.upstream: Connection | None = None
        self.attempt: ConnectAttempt | None = None
        self.held = bytearray()
        self.first = first  # the round-robin position this client started at
        self.tried = 0
        self.client_eof = self.upstream_eof = False
        self.held_paused = False  # client reading paused: too much held while connecting
        self.upstream_full = False  # client reading paused: the upstream's queue is full
        self.closed = False  # the client connection has closed

    def update_client_reading(self) -> None:
        if self.closed:
            return
        if self.held_paused or self.upstream_full:
            self.client.pause_reading()
        else:
            self.client.resume_reading()

    def finish_if_done(self) -> None:
        """Both directions have ended: close both sides (each flushes its queue first)."""
        if self.client_eof and self.upstream_eof:
            self.client.close()
            if self.upstream is not None:
                self.upstream.close()


class RelayHandler(Handler):
    """The client side of the relay: the handler of its listeners."""

    def __init__(self, upstreams: tuple[Upstream, ...] | None = None, send_proxy: int | None = None,
                 connect_timeout: float | None = None, hold_limit: int = HOLD_LIMIT) -> None:
        environ = os.environ
        if upstreams is None:
            upstreams = parse_upstreams(environ.get(UPSTREAM_ENV, ""))
        if send_proxy is None:
            send_proxy = parse_send_proxy(environ.get(SEND_PROXY_ENV, "off"))
        if connect_timeout is None:
            connect_timeout = parse_connect_timeout(
                environ.get(CONNECT_TIMEOUT_ENV, str(DEFAULT_CONNECT_TIMEOUT)))
        elif not 0 < connect_timeout < float("inf"):
            raise ConfigError("the connect timeout must be a positive number of seconds")
        self.upstreams = upstreams
        self.send_proxy = send_proxy
        self.connect_timeout = connect_timeout
        self.hold_limit = hold_limit
        self.upstream_side = UpstreamSide(self)
        self.server: Server | None = None
        self.outbound: ListenerConfig | None = None
        self._next = 0

    def server_started(self, server: Server) -> None:
        self.server = server
        # Upstream connections follow the same per-connection policies as the clients' (write
        # water marks, write_limit, idle and write timeouts), under their own name.
        base = server.listeners[0].config
        self.outbound = dataclasses.replace(base, name="upstream", tls=None, path=None, fd=None)
        logger.info("relaying to %s (round robin, PROXY header %s)",
                    ", ".join(upstream.label for upstream in self.upstreams),
                    f"v{self.send_proxy}" if self.send_proxy else "off")

    def dial(self, pair: Pair) -> None:
        """Connect ``pair`` to its next upstream."""
        assert self.server is not None
        upstream = self.upstreams[(pair.first + pair.tried) % len(self.upstreams)]
        if upstream.path is not None:
            pair.attempt = self.server.connect_unix(
                upstream.path, self.upstream_side, timeout=self.connect_timeout,
                user_data=pair, config=self.outbound)
        else:
            assert upstream.host is not None
            pair.attempt = self.server.connect(
                upstream.host, upstream.port, self.upstream_side,
                timeout=self.connect_timeout, user_data=pair, config=self.outbound)

    # -- the client's callbacks ------------------------------------------------------------------

    def connection_made(self, conn: Connection, first_data: memoryview | None) -> None:
        pair = Pair(conn, self._next)
        self._next = (self._next + 1) % len(self.upstreams)
        conn.user_data = pair
        self.dial(pair)
        if first_data is not None:
            self.data_received(conn, first_data)

    def data_received(self, conn: Connection, data: memoryview) -> None:
        pair: Pair = conn.user_data
        if pair.upstream is not None:
            pair.upstream.write(data)
            return
        pair.held += data  # the upstream is still connecting
        if len(pair.held) >= self.hold_limit and not pair.held_paused:
            pair.held_paused = True
            pair.update_client_reading()

    def eof_received(self, conn: Connection) -> None:
        pair: Pair = conn.user_data
        pair.client_eof = True
        if pair.upstream is not None:
            pair.upstream.write_eof()
            pair.finish_if_done()
        # else: connection_made of the upstream sends the FIN after the held bytes

    def pause_writing(self, conn: Connection) -> None:
        pair: Pair = conn.user_data
        if pair.upstream is not None:  # the client reads slowly: stop reading the upstream
            pair.upstream.pause_reading()

    def resume_writing(self, conn: Connection) -> None:
        pair: Pair = conn.user_data
        if pair.upstream is not None:
            pair.upstream.resume_reading()

    def connection_closed(self, conn: Connection, reason: CloseReason) -> None:
        pair: Pair | None = conn.user_data
        if pair is None:
            return  # closed before connection_made (a data-first connection that never spoke)
        pair.closed = True
        conn.user_data = None
        if pair.attempt is not None and pair.attempt.state == "connecting":
            pair.attempt.cancel()
        upstream = pair.upstream
        if upstream is not None:
            if reason in _ABRUPT:
                upstream.abort()
            else:
                upstream.close()


class UpstreamSide(Handler):
    """The upstream side of the relay: the handler of its outbound connections."""

    def __init__(self, relay: RelayHandler) -> None:
        self.relay = relay

    def connection_made(self, conn: Connection, first_data: memoryview | None) -> None:
        pair: Pair = conn.user_data
        if pair.closed:  # the client left while we connected
            conn.close()
            return
        pair.upstream = conn
        pair.attempt = None
        client = pair.client
        if self.relay.send_proxy:
            conn.write(encode_header(self.relay.send_proxy, client.peer_address,
                                     client.local_address))
        if pair.held:
            conn.write(pair.held)
            pair.held = bytearray()
        if pair.held_paused:
            pair.held_paused = False
            pair.update_client_reading()
        if pair.client_eof:
            conn.write_eof()
            pair.finish_if_done()

    def connect_failed(self, attempt: ConnectAttempt, exc: OSError) -> None:
        pair: Pair = attempt.user_data
        if pair.closed:
            return  # cancelled because the client left
        pair.tried += 1
        relay = self.relay
        # Through the connector's rate-limited log: with every upstream down, a flood of
        # clients leaves a few lines and a summary, not a line each.
        if pair.tried < len(relay.upstreams):
            attempt.log.log(f"upstream-failed {attempt.address}", logging.INFO,
                            f"{{count}} more connects to upstream {attempt.address} failed",
                            "upstream %s failed (%s); trying the next", attempt.address,
                            exc.strerror or exc)
            relay.dial(pair)
            return
        attempt.log.log("no-upstream", logging.WARNING,
                        "closed {count} more clients: no upstream took them",
                        "closed client %s: no upstream took it (%d tried; last: %s, %s)",
                        address_label(pair.client.peer_address), pair.tried, attempt.address,
                        exc.strerror or exc)
        pair.client.close()

    def data_received(self, conn: Connection, data: memoryview) -> None:
        pair: Pair = conn.user_data
        if not pair.closed:
            pair.client.write(data)

    def eof_received(self, conn: Connection) -> None:
        pair: Pair = conn.user_data
        pair.upstream_eof = True
        if not pair.closed:
            pair.client.write_eof()
        pair.finish_if_done()

    def pause_writing(self, conn: Connection) -> None:
        pair: Pair = conn.user_data
        pair.upstream_full = True  # the upstream reads slowly: stop reading the client
        pair.update_client_reading()

    def resume_writing(self, conn: Connection) -> None:
        pair: Pair = conn.user_data
        pair.upstream_full = False
        pair.update_client_reading()

    def connection_closed(self, conn: Connection, reason: CloseReason) -> None:
        pair: Pair | None = conn.user_data
        conn.user_data = None
        if pair is None or pair.closed or pair.upstream is not conn:
            return
        pair.upstream = None
        if reason in _ABRUPT:
            pair.client.abort()
        else:
            pair.client.close()

    def error(self, conn: Connection | None, exc: BaseException) -> None:
        self.relay.error(conn, exc)


