"""Every setting, declared once: its type, default and check live on the config dataclasses.

``ListenerConfig`` holds what differs per listening socket (the seed ran one server object per
port; portside runs one engine over many listeners, each with its own policy). ``ServerConfig``
holds what the whole engine shares. The command line derives its defaults from these classes, so
a default is written in exactly one place.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import ssl
from dataclasses import MISSING, dataclass, fields
from typing import Any

from portside.errors import ConfigError
from portside.protocols.proxy import Version as ProxyVersion

SECONDS = 1.0
KIB = 1024
MIB = 1024 * KIB


class AcceptPolicy(enum.Enum):
    """When a connection counts as accepted and is handed to the handler."""

    #: Only once its first bytes arrive; they come with ``connection_made`` (AcceptEx with data).
    DATA_FIRST = "data-first"
    #: As soon as the kernel completes the handshake; ``connection_made`` gets no data.
    IMMEDIATE = "immediate"


class Engine(enum.Enum):
    """Which event loop drives the connections."""

    AUTO = "auto"  #: the fastest engine that imports: compiled, else epoll (asyncio off Linux)
    COMPILED = "compiled"  #: portside's loop and connections in compiled code (Linux)
    EPOLL = "epoll"  #: portside's own loop on select.epoll, in pure Python (the reference)
    ASYNCIO = "asyncio"  #: a stdlib asyncio loop (or the running loop, with Server.serve())
    UVLOOP = "uvloop"  #: the asyncio engine on a uvloop loop


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One listening socket and the policies that apply to its connections.

    Give ``port`` (with ``host``) for TCP over IPv4 or IPv6, or ``path`` for a Unix-domain socket.
    """

    host: str = "127.0.0.1"
    port: int = 0
    path: str | None = None
    policy: AcceptPolicy = AcceptPolicy.IMMEDIATE
    name: str | None = None
    #: A data-first connection silent this long after accept is closed (the DoS defence).
    first_data_timeout: float = 5 * SECONDS
    #: Seconds for Linux TCP_DEFER_ACCEPT on data-first listeners; 0 leaves it off. See README.
    defer_accept: int = 1
    #: The ceiling on pending + active connections; accepting stops there, resumes below it.
    max_connections: int = 10_000
    #: Accepts per readiness wake-up (the seed's number of posted accepts).
    accept_batch: int = 64
    backlog: int = 1024
    #: Under the ceiling's pressure, pending connections silent this long are closed first.
    stale_pending_age: float = 1 * SECONDS
    #: Unsent bytes above which reading pauses; below ``write_low_water`` it resumes.
    write_high_water: int = 64 * KIB
    write_low_water: int = 16 * KIB
    #: Queued output past which a connection is reset: a peer that reads nothing while its
    #: handler keeps writing (Redis's client-output-buffer-limit). Must be >= write_high_water.
    write_limit: int = 64 * MIB
    #: Close a connection with no bytes in either direction for this long (0: off).
    idle_timeout: float = 0
    #: Close a connection that owes us the rest of a message for this long (0: off).
    read_timeout: float = 0
    #: Reset a connection whose peer takes none of our queued bytes for this long (0: off).
    write_timeout: float = 0
    #: Serve TLS with this server-side context (None: plain TCP). See README.
    tls: ssl.SSLContext | None = None
    #: Expect a PROXY protocol header (from a load balancer) first: off, v1, v2 or any.
    proxy_protocol: ProxyVersion = ProxyVersion.OFF
    #: Networks (CIDR) allowed to send a PROXY header; anyone else is refused. Empty (the
    #: default) trusts no TCP source; Unix-socket peers are always trusted.
    trusted_proxies: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.policy, AcceptPolicy):
            object.__setattr__(self, "policy", parse_policy(str(self.policy)))
        if not isinstance(self.proxy_protocol, ProxyVersion):
            object.__setattr__(self, "proxy_protocol", parse_proxy_version(
                str(self.proxy_protocol)))
        if self.path is None:
            _check(0 <= self.port <= 65535, "port", self.port, "must be 0-65535")
        _check_duration("first_data_timeout", self.first_data_timeout)
        # Unlike the optional timeouts, this one cannot be off: it is the DoS defence.
        _check(self.first_data_timeout > 0, "first_data_timeout", self.first_data_timeout,
               "must be > 0")
        _check_duration("stale_pending_age", self.stale_pending_age)
        for name in ("idle_timeout", "read_timeout", "write_timeout"):
            _check_duration(name, getattr(self, name))
        _check(self.defer_accept >= 0, "defer_accept", self.defer_accept, "must be >= 0")
        _check(self.max_connections >= 1, "max_connections", self.max_connections, "must be >= 1")
        _check(self.accept_batch >= 1, "accept_batch", self.accept_batch, "must be >= 1")
        _check(self.backlog >= 1, "backlog", self.backlog, "must be >= 1")
        _check(self.write_low_water >= 0, "write_low_water", self.write_low_water, "must be >= 0")
        _check(
            self.write_high_water >= self.write_low_water, "write_high_water",
            self.write_high_water, "must be >= write_low_water",
        )
        _check(self.write_limit >= self.write_high_water, "write_limit", self.write_limit,
               "must be >= write_high_water")
        if isinstance(self.trusted_proxies, str):
            object.__setattr__(self, "trusted_proxies", tuple(
                part.strip() for part in self.trusted_proxies.split(",") if part.strip()))
        for network in self.trusted_proxies:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ConfigError(f"trusted_proxies: {network!r} is not an address or network "
                                  "(CIDR)") from None

    @property
    def label(self) -> str:
        """The name used in logs and statistics: ``name``, else the address."""
        return self.name or self.address

    @property
    def address(self) -> str:
        """The configured address, as ``host:port``, ``[v6]:port`` or ``unix:path``."""
        if self.path is not None:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def description(self) -> str:
        """The address, with the name when there is one: for error messages."""
        return f"{self.address} ({self.name})" if self.name else self.address


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Settings shared by every listener of one engine."""

    engine: Engine = Engine.AUTO
    #: Graceful shutdown waits this long for live connections to finish before closing them.
    drain_timeout: float = 10 * SECONDS
    #: After our FIN, how long to read and discard until the peer's FIN, before closing anyway.
    linger_timeout: float = 2 * SECONDS
    buffer_size: int = 64 * KIB
    buffer_pool_max_free: int = 16
    #: Connection objects made at start-up, and the most kept for reuse.
    connection_pool_size: int = 64
    connection_pool_max_free: int = 1024
    #: On EMFILE and other capacity errors, accepting pauses this long before it retries.
    accept_backoff: float = 0.1 * SECONDS

    def __post_init__(self) -> None:
        if not isinstance(self.engine, Engine):
            object.__setattr__(self, "engine", parse_engine(str(self.engine)))
        _check_duration("drain_timeout", self.drain_timeout)
        _check_duration("linger_timeout", self.linger_timeout)
        _check_duration("accept_backoff", self.accept_backoff)
        _check(self.buffer_size >= 1, "buffer_size", self.buffer_size, "must be >= 1")
        for name in ("buffer_pool_max_free", "connection_pool_size", "connection_pool_max_free"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")


def default_of(cls: type[Any], name: str) -> Any:
    """The declared default of a config field, for the command line's help and parsing."""
    for field in fields(cls):
        if field.name == name and field.default is not MISSING:
            return field.default
    raise KeyError(name)


def parse_policy(text: str) -> AcceptPolicy:
    try:
        return AcceptPolicy(text.replace("_", "-").lower())
    except ValueError:
        choices = ", ".join(p.value for p in AcceptPolicy)
        raise ConfigError(f"unknown accept policy {text!r} (choose from {choices})") from None


def parse_proxy_version(text: str) -> ProxyVersion:
    try:
        return ProxyVersion(text.lower())
    except ValueError:
        choices = ", ".join(v.value for v in ProxyVersion)
        raise ConfigError(f"unknown PROXY protocol setting {text!r} (choose from {choices})"
                          ) from None


def parse_engine(text: str) -> Engine:
    try:
        return Engine(text.lower())
    except ValueError:
        choices = ", ".join(e.value for e in Engine)
        raise ConfigError(f"unknown engine {text!r} (choose from {choices})") from None


def _check(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{name} {rule}, got {value!r}")


def _check_duration(name: str, value: float) -> None:
    _check(
        isinstance(value, (int, float)) and math.isfinite(value) and value >= 0,
        name, value, "must be a number of seconds >= 0",
    )
