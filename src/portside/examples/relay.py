"""A TCP relay on outbound connections: each client is forwarded to an upstream server.

Theory of operation. Each client gets a ``Pair``: its connection, the attempt and then the
connection to its upstream, and what it sent while the upstream was still connecting (held, up
to ``hold_limit`` bytes; past that, reading from the client pauses). Upstreams are taken round
robin among those in rotation; a connect that fails (refused, or no answer within the connect
timeout) is tried again up to ``retries`` times, on the next upstream in rotation with
``redispatch`` (HAProxy's ``retries`` and ``option redispatch``); then the client is closed.
With ``check_interval``, each upstream gets a TCP connect check that often: ``fall`` failures
in a row take it out of rotation, ``rise`` successes put it back; with none in rotation, a
client is closed at once ("no-upstream"), counted and logged at a limited rate. Each upstream's
state is in ``Server.statistics().upstreams`` (``UpstreamStatistics``: ctl, metrics, top).

Bytes flow with backpressure both ways: when one side's write queue passes
``write_high_water`` (``pause_writing``), reading from the other side pauses, and it resumes at
``write_low_water`` (``resume_writing``), so a slow reader on either side holds about high
water plus one read in the relay, never more. Half-close is carried across: one side's EOF
becomes ``write_eof`` (FIN once the queued bytes are sent) on the other, and once both
directions have ended both connections close. A reset or an error on one side aborts the other.
With ``send_proxy``, the upstream first receives a PROXY header (v1 or v2) naming the client.

Nothing holds a pair for ever (HAProxy's tunnel timeouts): a pair with no byte either way for
``tunnel_timeout`` is closed, and once one side has half-closed, ``client_fin_timeout`` or
``server_fin_timeout`` (shorter) takes over. A side closed after its peer left flushes within
the engine's linger_timeout or is reset (``Connection._arm_flush_deadline``). Upstream
connections (connecting, open or closing) count against ``max_upstream_connections``: a client
arriving at the limit is closed at once ("upstream-limit").

The command line (``portside relay``) passes the ``RelayConfig`` settings to every process
(workers included) in their ``PORTSIDE_<NAME>`` environment variables, which
``RelayHandler()`` reads (``relay_config``).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from portside import CloseReason, ConnectAttempt, Connection, Handler, ListenerConfig, Server
from portside.config import RelayConfig, address_label, format_host_port, parse_listen, settings_of
from portside.connection import as_layer
from portside.engine.lograte import LogLimiter
from portside.engine.reactor import Reactor, TimerHandle
from portside.engine.timeouts import TimeoutTracker
from portside.errors import ConfigError
from portside.protocols.proxy import Version, encode_header
from portside.statistics import UpstreamStatistics

if TYPE_CHECKING:
    from portside.engine.connection import Connection as EngineConnection

logger = logging.getLogger("portside.relay")

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
        if "@" in part or "=" in part:  # a listener's POLICY@ or =MODULE:CLASS
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


def relay_config(environ: Mapping[str, str], **given: object) -> RelayConfig:
    """The relay's settings: ``given`` values, else the ``PORTSIDE_<NAME>`` variables, else
    the declared defaults; each checked, bad input a one-line ConfigError."""
    values: dict[str, object] = {}
    for declared in settings_of(RelayConfig):
        if declared.name in given:
            value = given[declared.name]
            rule = declared.kind.check(value)
            if rule is not None:
                raise ConfigError(f"{declared.flag} {rule}, got {value!r}")
            values[declared.name] = value
            continue
        text = environ.get(declared.env)
        if text is None:
            continue
        try:
            values[declared.name] = declared.kind.parse(text)
        except (ValueError, ConfigError) as exc:
            raise ConfigError(f"{declared.flag} ({declared.env}): {exc}") from None
    config = RelayConfig(**values)  # type: ignore[arg-type]
    upstreams = parse_upstreams(config.upstream)
    parse_send_proxy(config.send_proxy)
    upstream_context(config, upstreams)
    return config


def upstream_context(config: RelayConfig,
                     upstreams: tuple[Upstream, ...]) -> ssl.SSLContext | None:
    """The client-side context for ``--upstream-tls`` (None without it): the system's CAs or
    ``upstream_ca``, names checked unless ``upstream_verify`` is off; a CA file that cannot be
    read, or a Unix upstream whose name cannot be checked, is a one-line ConfigError."""
    if not config.upstream_tls:
        return None
    try:
        context = ssl.create_default_context(cafile=config.upstream_ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--upstream-ca {config.upstream_ca}: {exc.strerror or exc}") from None
    if not config.upstream_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif config.upstream_sni is None and any(item.path is not None for item in upstreams):
        raise ConfigError("--upstream-tls to a unix: upstream needs --upstream-sni (the name "
                          "its certificate must have) or --no-upstream-verify")
    return context


def _tracked(conn: Connection) -> EngineConnection:
    """A client connection as the engine's ``TimeoutTracker`` keys it (every engine's
    connection class is hashable and tracked the same way)."""
    return cast("EngineConnection", conn)


class UpstreamState:
    """One upstream's place in rotation and its counters (see ``UpstreamStatistics``)."""

    __slots__ = ("active", "check", "check_status", "checks_failed", "checks_passed",
                 "connect_failed", "connected", "connecting", "downs", "redispatches",
                 "retries", "streak", "up", "upstream")

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.up = True  # as HAProxy: in rotation until its checks say otherwise
        self.streak = 0  # checks in a row that disagree with ``up``
        self.check: ConnectAttempt | None = None  # the health check under way
        self.check_status = "none"
        self.checks_passed = self.checks_failed = self.downs = 0
        self.connecting = self.active = self.connected = self.connect_failed = 0
        self.retries = self.redispatches = 0

    def statistics(self) -> UpstreamStatistics:
        return UpstreamStatistics(
            name=self.upstream.label, state="up" if self.up else "down", up=int(self.up),
            check_status=self.check_status, checks_passed=self.checks_passed,
            checks_failed=self.checks_failed, downs=self.downs, connecting=self.connecting,
            active=self.active, connected=self.connected, connect_failed=self.connect_failed,
            retries=self.retries, redispatches=self.redispatches)


class Pair:
    """One client and its upstream."""

    __slots__ = ("attempt", "client", "client_eof", "closed", "held", "held_paused", "state",
                 "timeout", "tried", "upstream", "upstream_eof", "upstream_full")

    def __init__(self, client: Connection) -> None:
        self.client = client
        self.upstream: Connection | None = None
        self.attempt: ConnectAttempt | None = None
        self.state: UpstreamState | None = None  # the upstream dialled last
        self.held = bytearray()
        self.tried = 0  # connects that failed
        self.client_eof = self.upstream_eof = False
        self.held_paused = False  # client reading paused: too much held while connecting
        self.upstream_full = False  # client reading paused: the upstream's queue is full
        self.closed = False  # the client connection has closed
        self.timeout: TimeoutTracker | None = None  # the pair's inactivity deadline now

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

    def touch(self) -> None:
        """A byte went one way or the other: the inactivity deadline starts again."""
        if self.timeout is not None and not self.closed:
            self.timeout.start(_tracked(self.client))

    def use_timeout(self, tracker: TimeoutTracker | None) -> None:
        """Move the pair to ``tracker`` (a fin timeout once a side half-closed), if set."""
        if tracker is None or self.closed:
            return
        if self.timeout is not None:
            self.timeout.stop(_tracked(self.client))
        self.timeout = tracker
        tracker.start(_tracked(self.client))


class RelayHandler(Handler):
    """The client side of the relay: the handler of its listeners."""

    def __init__(self, upstreams: tuple[Upstream, ...] | None = None, send_proxy: int | None = None,
                 connect_timeout: float | None = None, hold_limit: int = HOLD_LIMIT,
                 config: RelayConfig | None = None, **settings: object) -> None:
        """``config`` (or, without it, the ``PORTSIDE_<NAME>`` variables and the defaults),
        with ``settings`` (``RelayConfig`` field names) in place of its values; ``upstreams``,
        ``send_proxy`` and ``connect_timeout`` as parsed values."""
        if config is None:
            if upstreams is not None:
                settings.setdefault("upstream", ",".join(item.label for item in upstreams))
            config = relay_config(os.environ, **settings)
        elif settings:
            config = dataclasses.replace(config, **settings)  # type: ignore[arg-type]
        if connect_timeout is not None:
            if not 0 < connect_timeout < float("inf"):
                raise ConfigError("the connect timeout must be a positive number of seconds")
            config = dataclasses.replace(config, connect_timeout=connect_timeout)
        self.config = config
        self.upstreams = upstreams if upstreams is not None else parse_upstreams(config.upstream)
        self.send_proxy = send_proxy if send_proxy is not None else \
            parse_send_proxy(config.send_proxy)
        self.connect_timeout = config.connect_timeout
        #: The client-side context upstream connections speak TLS with (--upstream-tls).
        self.upstream_tls = upstream_context(config, self.upstreams)
        self.hold_limit = hold_limit
        self.states = tuple(UpstreamState(upstream) for upstream in self.upstreams)
        self.upstream_side = UpstreamSide(self)
        self.checker = HealthChecker(self)
        self.server: Server | None = None
        self.outbound: ListenerConfig | None = None
        self.check_config: ListenerConfig | None = None
        self.max_upstream = config.max_upstream_connections
        self.log: LogLimiter | None = None
        self.tunnel: TimeoutTracker | None = None
        self.client_fin: TimeoutTracker | None = None
        self.server_fin: TimeoutTracker | None = None
        self._next = 0

    def server_started(self, server: Server) -> None:
        self.server = server
        # Upstream connections follow the same per-connection policies as the clients' (write
        # water marks, write_limit, idle and write timeouts, socket options), under their own
        # name; health checks only connect, under theirs.
        base = server.listeners[0].config
        self.outbound = dataclasses.replace(base, name="upstream", tls=None, path=None, fd=None,
                                            handler=None)
        self.check_config = dataclasses.replace(self.outbound, name="check", idle_timeout=0.0,
                                                write_timeout=0.0)
        if not self.max_upstream:  # the pair counts: as many upstreams as clients
            self.max_upstream = sum(listener.config.max_connections
                                    for listener in server.listeners)
        server.add_upstream_statistics(
            lambda: [state.statistics() for state in self.states])
        server.add_service(self.checker)  # attached now: the server is running
        checks = (f", TCP checks every {self.config.check_interval:g} s"
                  if self.config.check_interval else "")
        tls = "" if self.upstream_tls is None else (
            ", TLS to upstreams" if self.config.upstream_verify
            else ", TLS to upstreams (NOT verified)")
        logger.info("relaying to %s (round robin, PROXY header %s%s%s)",
                    ", ".join(upstream.label for upstream in self.upstreams),
                    f"v{self.send_proxy}" if self.send_proxy else "off", checks, tls)

    def shutdown_started(self, server: Server) -> None:
        self.checker.close()

    def attach(self, reactor: Reactor) -> None:
        """The loop's clock, for the pairs' deadlines and the rate-limited log."""
        self.log = LogLimiter(logger, reactor.time, reactor.call_later)
        config = self.config
        self.tunnel = self._tracker(reactor, config.tunnel_timeout, CloseReason.TUNNEL_TIMEOUT)
        self.client_fin = self._tracker(reactor, config.client_fin_timeout,
                                        CloseReason.FIN_TIMEOUT)
        self.server_fin = self._tracker(reactor, config.server_fin_timeout,
                                        CloseReason.FIN_TIMEOUT)

    def _tracker(self, reactor: Reactor, timeout: float,
                 reason: CloseReason) -> TimeoutTracker | None:
        if not timeout:
            return None

        def expire(client: EngineConnection) -> bool:
            pair: Pair | None = client.user_data
            if pair is None or pair.closed:
                return False
            pair.timeout = None
            if pair.upstream is not None:
                as_layer(pair.upstream).close_for(reason)
            elif pair.attempt is not None:
                pair.attempt.cancel()
            as_layer(client).close_for(reason)
            return True

        tracker = TimeoutTracker(timeout, expire)
        tracker.attach(reactor)
        return tracker

    # -- choosing an upstream ----------------------------------------------------------------------

    def upstream_count(self) -> int:
        return sum(state.connecting + state.active for state in self.states)

    def choose(self, pair: Pair) -> UpstreamState | None:
        """The upstream for ``pair``'s next connect: round robin among those in rotation; a
        retry goes to the next in rotation after the one that failed (``redispatch``), or to
        it again. None when none is in rotation."""
        states = self.states
        failed = pair.state
        if failed is not None and not self.config.redispatch and failed.up:
            return failed
        start = self._next if failed is None else states.index(failed) + 1
        for step in range(len(states)):
            state = states[(start + step) % len(states)]
            if state.up:
                if failed is None:
                    self._next = (start + step + 1) % len(states)
                return state
        return None

    def dial(self, pair: Pair) -> None:
        """Connect ``pair`` to its next upstream, or close it when none is in rotation."""
        assert self.server is not None
        state = self.choose(pair)
        if state is None:
            self.refuse(pair, CloseReason.NO_UPSTREAM, "every upstream is down")
            return
        if pair.state is not None:
            pair.state.retries += 1
            if state is not pair.state:
                pair.state.redispatches += 1
        pair.state = state
        state.connecting += 1
        upstream = state.upstream
        client = pair.client
        # The PROXY header goes first, in the clear (before the ClientHello with TLS).
        header = encode_header(self.send_proxy, client.peer_address, client.local_address) \
            if self.send_proxy else b""
        tls, sni = self.upstream_tls, self.config.upstream_sni
        if upstream.path is not None:
            pair.attempt = self.server.connect_unix(
                upstream.path, self.upstream_side, timeout=self.connect_timeout,
                user_data=pair, config=self.outbound, tls=tls, server_hostname=sni,
                preamble=header)
        else:
            assert upstream.host is not None
            pair.attempt = self.server.connect(
                upstream.host, upstream.port, self.upstream_side,
                timeout=self.connect_timeout, user_data=pair, config=self.outbound, tls=tls,
                server_hostname=sni, preamble=header)

    def refuse(self, pair: Pair, reason: CloseReason, why: str) -> None:
        """Close the client at once (counted by ``reason``), with a rate-limited log line."""
        assert self.log is not None
        self.log.log(reason.value, logging.WARNING,
                     f"closed {{count}} more clients: {why}",
                     "closed client %s: %s", address_label(pair.client.peer_address), why)
        as_layer(pair.client).close_for(reason)

    # -- the client's callbacks ------------------------------------------------------------------

    def connection_made(self, conn: Connection, first_data: memoryview | None) -> None:
        pair = Pair(conn)
        conn.user_data = pair
        if self.upstream_count() >= self.max_upstream:
            self.refuse(pair, CloseReason.UPSTREAM_LIMIT,
                        f"the relay holds {self.max_upstream} upstream connections "
                        "(max_upstream_connections)")
            return
        pair.use_timeout(self.tunnel)
        self.dial(pair)
        if first_data is not None and not pair.closed:
            self.data_received(conn, first_data)

    def data_received(self, conn: Connection, data: memoryview) -> None:
        pair: Pair = conn.user_data
        pair.touch()
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
        if not pair.upstream_eof:
            pair.use_timeout(self.client_fin)
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
        if pair.timeout is not None:
            pair.timeout.stop(_tracked(conn))
            pair.timeout = None
        pair.closed = True
        conn.user_data = None
        if pair.attempt is not None and pair.attempt.state == "connecting":
            pair.attempt.cancel()
        upstream = pair.upstream
        if upstream is not None:
            # Gracefully, the upstream still gets what the client sent; if it never reads,
            # the engine resets it after linger_timeout (the flush deadline).
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
        state = pair.state
        assert state is not None
        state.connecting -= 1
        state.active += 1  # until connection_closed, closing included
        state.connected += 1
        pair.attempt = None
        if pair.closed:  # the client left while we connected
            conn.close()
            return
        pair.upstream = conn  # the PROXY header, if any, went first (dial's preamble)
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
        state = pair.state
        assert state is not None
        state.connecting -= 1
        pair.attempt = None
        if pair.closed:
            return  # cancelled because the client left
        state.connect_failed += 1
        pair.tried += 1
        relay = self.relay
        # Through the connector's rate-limited log: with every upstream down, a flood of
        # clients leaves a few lines and a summary, not a line each.
        if pair.tried <= relay.config.retries:
            attempt.log.log(f"upstream-failed {attempt.address}", logging.INFO,
                            f"{{count}} more connects to upstream {attempt.address} failed",
                            "upstream %s failed (%s); trying again", attempt.address,
                            exc.strerror or exc)
            relay.dial(pair)
            return
        attempt.log.log("no-upstream", logging.WARNING,
                        "closed {count} more clients: no upstream took them",
                        "closed client %s: no upstream took it (%d tried; last: %s, %s)",
                        address_label(pair.client.peer_address), pair.tried, attempt.address,
                        exc.strerror or exc)
        as_layer(pair.client).close_for(CloseReason.NO_UPSTREAM)

    def data_received(self, conn: Connection, data: memoryview) -> None:
        pair: Pair = conn.user_data
        if not pair.closed:
            pair.touch()
            pair.client.write(data)

    def eof_received(self, conn: Connection) -> None:
        pair: Pair = conn.user_data
        pair.upstream_eof = True
        if not pair.closed:
            if not pair.client_eof:
                pair.use_timeout(self.relay.server_fin)
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
        if pair is None:
            return
        if pair.state is not None:
            pair.state.active -= 1
        if pair.closed or pair.upstream is not conn:
            return
        pair.upstream = None
        if reason in _ABRUPT:
            pair.client.abort()
        else:
            pair.client.close()

    def error(self, conn: Connection | None, exc: BaseException) -> None:
        self.relay.error(conn, exc)


class HealthChecker(Handler):
    """Active health checks (a ``Service`` on the server's loop): every ``check_interval``,
    a TCP connect to each upstream, aborted as soon as it is made (no TIME_WAIT on the
    upstream's side, as HAProxy's checks). ``fall`` failures in a row take an upstream out of
    rotation, ``rise`` successes put it back; each change is logged."""

    def __init__(self, relay: RelayHandler) -> None:
        self.relay = relay
        self._reactor: Reactor | None = None
        self._timer: TimerHandle | None = None

    def attach(self, reactor: Reactor) -> None:
        self.relay.attach(reactor)
        self._reactor = reactor
        if self.relay.config.check_interval:
            self._timer = reactor.call_later(0, self._round)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._reactor = None

    def _round(self) -> None:
        relay = self.relay
        server, reactor = relay.server, self._reactor
        if server is None or reactor is None:
            return
        self._timer = reactor.call_later(relay.config.check_interval, self._round)
        for state in relay.states:
            if state.check is not None:
                continue  # the last one is still under way (its timeout ends it)
            upstream = state.upstream
            timeout = relay.config.check_timeout
            if upstream.path is not None:
                state.check = server.connect_unix(upstream.path, self, timeout=timeout,
                                                  user_data=state, config=relay.check_config)
            else:
                assert upstream.host is not None
                state.check = server.connect(upstream.host, upstream.port, self,
                                             timeout=timeout, user_data=state,
                                             config=relay.check_config)

    def connection_made(self, conn: Connection, first_data: memoryview | None) -> None:
        state: UpstreamState = conn.user_data
        conn.user_data = None
        conn.abort()
        state.check = None
        state.checks_passed += 1
        self._result(state, True, "L4OK", "")

    def connect_failed(self, attempt: ConnectAttempt, exc: OSError) -> None:
        state: UpstreamState = attempt.user_data
        state.check = None
        if exc.errno == errno.ECONNABORTED:
            return  # the server is shutting down: not the upstream's fault
        state.checks_failed += 1
        status = "L4TOUT" if isinstance(exc, TimeoutError) else "L4CON"
        self._result(state, False, status, str(exc.strerror or exc))

    def _result(self, state: UpstreamState, passed: bool, status: str, detail: str) -> None:
        state.check_status = status
        if passed == state.up:
            state.streak = 0
            return
        state.streak += 1
        config = self.relay.config
        if state.streak < (config.rise if passed else config.fall):
            return
        state.streak = 0
        state.up = passed
        left = sum(other.up for other in self.relay.states)
        if passed:
            logger.info("upstream %s is UP (%s, %d checks passed); %d of %d in rotation",
                        state.upstream.label, status, config.rise, left, len(self.relay.states))
        else:
            state.downs += 1
            logger.warning("upstream %s is DOWN (%s: %s, %d checks failed); %d of %d in "
                           "rotation", state.upstream.label, status, detail, config.fall, left,
                           len(self.relay.states))

    def error(self, conn: Connection | None, exc: BaseException) -> None:
        self.relay.error(conn, exc)
