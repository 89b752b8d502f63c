"""Every setting, declared once: its type, default, check, command-line flag and help.

Theory of operation. Each tunable field of the three config dataclasses carries a ``Setting``
in its field metadata (what gunicorn's ``Setting`` classes hold): a ``Kind`` that parses text
and checks values, the help text, and the flags. The dataclass field itself holds the type and
the default. Everything else is derived from these declarations: the checks run by
``__post_init__``, the ``portside`` command's flags and their help, the ``PORTSIDE_...``
environment variables, the keys of a ``portside.toml`` file (``settings.py`` reads those
three), and the table of settings in ``docs/settings.md`` (``python -m portside.settings``).

``ListenerConfig`` holds what differs per listening socket; ``ServerConfig`` what one engine
shares; ``ProcessConfig`` what only the command line's process needs (workers, logs, TLS files).
This module imports nothing heavy: ``portside ctl`` reads it on its way to a quick answer.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import re
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from portside.errors import ConfigError
from portside.protocols.proxy import Version as ProxyVersion
from portside.text import printable

if TYPE_CHECKING:
    import ssl

    from portside.handler import Handler

SECONDS = 1.0
KIB = 1024
MIB = 1024 * KIB
INT_MAX = 2**31 - 1  # the largest value a socket option (a C int) can carry
MAX_SECONDS = 366 * 24 * 3600.0  # longer "timeouts" are mistakes, and overflow some loops


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


class LogFormat(enum.Enum):
    """How log lines are written to stderr."""

    TEXT = "text"  #: time, [pid], level, logger: message
    JSON = "json"  #: one JSON object per line, for log shippers


class LogLevel(enum.Enum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


# -- kinds: how a setting's text is read and its value checked ------------------------------------


class Kind:
    """How one kind of setting is parsed from text (flag, environment, file) and checked."""

    metavar = "VALUE"

    def parse(self, text: str) -> Any:
        """The value ``text`` means; ValueError with the rule when it means none."""
        return text

    def coerce(self, value: Any) -> Any:
        """A value from Python code or a TOML file, in this kind's type (text is parsed)."""
        return self.parse(value) if isinstance(value, str) else value

    def check(self, value: Any) -> str | None:
        """None if ``value`` is acceptable, else the rule it breaks ("must be ...")."""
        return None

    def show(self, value: Any) -> str:
        """``value`` as a user would write it (help texts and the docs table)."""
        if isinstance(value, enum.Enum):
            return str(value.value)
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, tuple):
            return ",".join(map(str, value)) or "(none)"
        if value is None:
            return "(none)"
        return str(value)

    def dump(self, value: Any) -> Any:
        """``value`` as JSON data (what a worker process is sent)."""
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, tuple):
            return list(value)
        return value

    def describe(self) -> str:
        """The kind, for the docs table."""
        return self.metavar.lower()


@dataclass(frozen=True)
class Seconds(Kind):
    """A duration in seconds; ``positive`` rules out 0 (where 0 could only be a mistake)."""

    positive: bool = False
    off_at_zero: bool = False
    metavar = "SECONDS"

    def parse(self, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{self.rule()}, got {text!r}") from None
        if self.check(value) is not None:
            raise ValueError(f"{self.rule()}, got {text!r}")
        return value

    def coerce(self, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return super().coerce(value)

    def rule(self) -> str:
        low = "> 0" if self.positive else ">= 0"
        return f"must be a number of seconds {low}, at most {MAX_SECONDS:.0f}"

    def check(self, value: Any) -> str | None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
            and math.isfinite(value) and (value > 0 if self.positive else value >= 0) \
            and value <= MAX_SECONDS
        return None if ok else self.rule()

    def describe(self) -> str:
        return "seconds" + (" (0: off)" if self.off_at_zero else "")


@dataclass(frozen=True)
class Count(Kind):
    """A whole number in ``minimum..maximum`` (a socket option's ceiling is INT_MAX)."""

    minimum: int = 0
    maximum: int = INT_MAX
    unit: str = ""
    metavar = "N"

    def parse(self, text: str) -> int:
        try:
            value = int(text.replace("_", ""))
        except ValueError:
            raise ValueError(f"{self.rule()}, got {text!r}") from None
        if self.check(value) is not None:
            raise ValueError(f"{self.rule()}, got {text!r}")
        return value

    def rule(self) -> str:
        return f"must be a whole number {self.minimum}-{self.maximum}"

    def check(self, value: Any) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool) \
            and self.minimum <= value <= self.maximum
        return None if ok else self.rule()

    def describe(self) -> str:
        return self.unit or "number"


@dataclass(frozen=True)
class Choice(Kind):
    """One of an enum's values."""

    enum_class: type[enum.Enum] = LogLevel
    noun: str = "value"  # in "unknown engine 'x' (choose from ...)"

    @property
    def metavar(self) -> str:  # type: ignore[override]
        return "{" + ",".join(str(item.value) for item in self.enum_class) + "}"

    def parse(self, text: str) -> enum.Enum:
        try:
            return self.enum_class(text.replace("_", "-").lower())
        except ValueError:
            raise ValueError(f"unknown {self.noun} {text!r} (choose from {self.choices()})"
                             ) from None

    def choices(self) -> str:
        return ", ".join(str(item.value) for item in self.enum_class)

    def check(self, value: Any) -> str | None:
        return None if isinstance(value, self.enum_class) else f"must be one of {self.choices()}"

    def describe(self) -> str:
        return " / ".join(str(item.value) for item in self.enum_class)


@dataclass(frozen=True)
class Switch(Kind):
    """On or off: a flag on the command line; 1/0, true/false, yes/no, on/off elsewhere."""

    metavar = ""

    def parse(self, text: str) -> bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"must be on or off (1/0, true/false, yes/no), got {text!r}")

    def check(self, value: Any) -> str | None:
        return None if isinstance(value, bool) else "must be on or off"

    def describe(self) -> str:
        return "on / off"


@dataclass(frozen=True)
class Text(Kind):
    """Free text (a path, a name); ``optional`` allows None, never an empty string."""

    metavar_text: str = "TEXT"
    optional: bool = True

    @property
    def metavar(self) -> str:  # type: ignore[override]
        return self.metavar_text

    def check(self, value: Any) -> str | None:
        if value is None and self.optional:
            return None
        return None if isinstance(value, str) and value else "must not be empty"

    def describe(self) -> str:
        return self.metavar_text.lower()


@dataclass(frozen=True)
class Networks(Kind):
    """A comma-separated list of networks (CIDR) or single addresses."""

    metavar = "CIDR,..."

    def parse(self, text: str) -> tuple[str, ...]:
        value = tuple(part.strip() for part in text.split(",") if part.strip())
        rule = self.check(value)
        if rule is not None:
            raise ValueError(rule)
        return value

    def coerce(self, value: Any) -> Any:
        if isinstance(value, list):
            return tuple(str(item) for item in value)
        return super().coerce(value)

    def check(self, value: Any) -> str | None:
        if not isinstance(value, tuple):
            return "must be a list of networks"
        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                return f"{network!r} is not an address or network (CIDR)"
        return None

    def describe(self) -> str:
        return "networks (CIDR), comma-separated"


@dataclass(frozen=True)
class Address(Kind):
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (loopback), for a side service like metrics."""

    metavar = "HOST:PORT"

    def parse(self, text: str) -> str:
        host, port = parse_host_port(text)
        return format_host_port(host, port)

    def check(self, value: Any) -> str | None:
        if value is None:
            return None
        try:
            parse_host_port(value)
        except ConfigError as exc:
            return str(exc)
        return None

    def describe(self) -> str:
        return "host:port (:PORT is 127.0.0.1)"


@dataclass(frozen=True)
class Workers(Kind):
    """A number of worker processes, or ``auto`` (one per CPU)."""

    metavar = "N|auto"

    def parse(self, text: str) -> int:
        if text.strip().lower() == "auto":
            import os

            return os.cpu_count() or 1
        try:
            return int(Count(1, 1024).parse(text))
        except ValueError:
            raise ValueError(f"{self.rule()}, got {text!r}") from None

    def rule(self) -> str:
        return f"{Count(1, 1024).rule()}, or auto"

    def check(self, value: Any) -> str | None:
        return None if value is None or Count(1, 1024).check(value) is None else self.rule()

    def describe(self) -> str:
        return "number or auto"


@dataclass(frozen=True)
class Listens(Kind):
    """Listening addresses, one per flag (``--listen`` is repeatable), each with the handler
    that serves it if not the command's own: see ``parse_listen``."""

    metavar = "[POLICY@]ADDRESS[=MODULE:CLASS]"

    def parse(self, text: str) -> tuple[str, ...]:
        parse_listen(text)  # checked now; kept as text, which is how a worker is told
        return (text,)

    def coerce(self, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            for item in value:
                parse_listen(str(item))
            return tuple(str(item) for item in value)
        return value

    def check(self, value: Any) -> str | None:
        if not isinstance(value, tuple):
            return "must be a list of addresses"
        for item in value:
            try:
                parse_listen(item)
            except ConfigError as exc:
                return str(exc)
        return None

    def describe(self) -> str:
        return "addresses (each =MODULE:CLASS optional), repeatable"


@dataclass(frozen=True)
class Keepalive(Kind):
    """nginx's ``so_keepalive``: off, on (the kernel's timings), or IDLE:INTERVAL:COUNT, each
    part optional (empty: the kernel's), times in seconds or with an s, m or h suffix."""

    metavar = "off|on|IDLE:INTVL:CNT"

    def parse(self, text: str) -> str:
        timings = parse_keepalive(text)  # ValueError with the rule
        if timings is None:
            return "off"
        if timings == (0, 0, 0):
            return "on"
        return ":".join(str(part) if part else "" for part in timings)

    def check(self, value: Any) -> str | None:
        try:
            parse_keepalive(value)
        except (ValueError, TypeError) as exc:
            return str(exc)
        return None

    def describe(self) -> str:
        return "off / on / idle:interval:count"


#: The kernel's ceilings for TCP_KEEPIDLE, TCP_KEEPINTVL (seconds) and TCP_KEEPCNT.
_KEEPALIVE_LIMITS = (32_767, 32_767, 127)
_TIME_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_keepalive(text: str) -> tuple[int, int, int] | None:
    """``so_keepalive`` text as (idle, interval, count), 0 where the kernel's default applies;
    None when off. ValueError says what is wrong."""
    rule = ("must be off, on or IDLE:INTERVAL:COUNT (nginx's so_keepalive; idle and interval "
            "in seconds, or with s/m/h; idle and interval at most 32767 s, count at most 127)")
    if not isinstance(text, str):
        raise TypeError(rule)
    lowered = text.strip().lower()
    if lowered in ("off", "0", "no", "false"):
        return None
    if lowered in ("on", "1", "yes", "true"):
        return (0, 0, 0)
    parts = lowered.split(":")
    if len(parts) != 3:
        raise ValueError(f"{rule}, got {text!r}")
    values = []
    for index, part in enumerate(parts):
        scale = 1
        if index < 2 and part[-1:] in _TIME_UNITS:
            part, scale = part[:-1], _TIME_UNITS[part[-1]]
        if not part:
            if scale != 1:
                raise ValueError(f"{rule}, got {text!r}")
            values.append(0)
            continue
        if not part.isdigit() or not 1 <= int(part) * scale <= _KEEPALIVE_LIMITS[index]:
            raise ValueError(f"{rule}, got {text!r}")
        values.append(int(part) * scale)
    return (values[0], values[1], values[2])


@dataclass(frozen=True)
class Setting:
    """One setting's declaration beside its dataclass field (which holds type and default)."""

    kind: Kind
    help: str
    #: Extra flags users of other servers look for (gunicorn's --bind, uvicorn's --ssl-certfile).
    aliases: tuple[str, ...] = ()
    #: Whether the setting can be given more than once on the command line (it is a list).
    repeatable: bool = False
    #: The default in words, where the value alone would say little ("one process").
    default_text: str = ""
    name: str = ""  # filled in by ``settings_of``

    def show_default(self, default: Any) -> str:
        return self.default_text or self.kind.show(default)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "PORTSIDE_" + self.name.upper()


def setting(default: Any, kind: Kind, help: str, *, aliases: tuple[str, ...] = (),
            repeatable: bool = False, default_text: str = "") -> Any:
    """A dataclass field that is a setting: its default and its ``Setting`` declaration."""
    return field(default=default, metadata={"setting": Setting(
        kind, help, aliases, repeatable, default_text)})


# -- the three groups of settings -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One listening socket and the policies that apply to its connections.

    Give ``port`` (with ``host``) for TCP over IPv4 or IPv6, ``path`` for a Unix-domain socket,
    or ``fd`` for a socket already listening that this process inherited.
    """

    host: str = "127.0.0.1"
    port: int = 0
    path: str | None = None
    policy: AcceptPolicy = AcceptPolicy.IMMEDIATE
    name: str | None = None
    fd: int | None = None
    first_data_timeout: float = setting(
        5 * SECONDS, Seconds(positive=True),
        "Data-first listeners close a connection that sends nothing for this long after it "
        "was accepted (the defence against silent connections; cannot be off).")
    defer_accept: int = setting(
        1, Count(0, INT_MAX, "seconds (0: off)"),
        "Data-first listeners: how long the Linux kernel itself holds a silent new connection "
        "before telling portside (TCP_DEFER_ACCEPT); 0 turns it off.")
    max_connections: int = setting(
        10_000, Count(1, INT_MAX, "connections"),
        "Per listener: accepting stops at this many open connections and resumes below it.")
    accept_batch: int = setting(
        64, Count(1, 65_536, "connections"),
        "How many connections are accepted each time the listener wakes up.")
    backlog: int = setting(
        1024, Count(1, INT_MAX, "connections"),
        "Connections the kernel queues before portside accepts them (listen(2); the kernel "
        "caps it at net.core.somaxconn).")
    stale_pending_age: float = setting(
        1 * SECONDS, Seconds(),
        "At the connection ceiling, data-first connections silent this long are closed first "
        "to make room.")
    write_high_water: int = setting(
        64 * KIB, Count(0, INT_MAX, "bytes"),
        "Reading from a connection pauses while more than this many bytes wait to be sent "
        "to it.")
    write_low_water: int = setting(
        16 * KIB, Count(0, INT_MAX, "bytes"),
        "Reading resumes once the bytes waiting to be sent fall to this many.")
    write_limit: int = setting(
        64 * MIB, Count(0, 2**62, "bytes"),
        "A connection with more than this many bytes waiting to be sent is reset (a client "
        "that reads nothing; Redis's client-output-buffer-limit). At least --write-high-water.")
    idle_timeout: float = setting(
        0.0, Seconds(off_at_zero=True),
        "Close a connection with no bytes in either direction for this long (0: off).")
    read_timeout: float = setting(
        0.0, Seconds(off_at_zero=True),
        "Close a connection that leaves a message unfinished for this long (0: off).")
    write_timeout: float = setting(
        0.0, Seconds(off_at_zero=True),
        "Reset a connection whose peer takes none of the bytes waiting for it this long "
        "(0: off).")
    # The accepted sockets' options, under the names nginx's listen directive uses
    # (tcp_nodelay, so_keepalive=on|off|IDLE:INTVL:CNT, rcvbuf, sndbuf); tcp_user_timeout is
    # HAProxy's "tcp-ut", under the kernel's name. The defaults set nothing but TCP_NODELAY.
    tcp_nodelay: bool = setting(
        True, Switch(),
        "Set TCP_NODELAY on accepted TCP connections, so small replies are not held back by "
        "Nagle's algorithm (nginx's tcp_nodelay).")
    so_keepalive: str = setting(
        "off", Keepalive(),
        "TCP keepalive on accepted connections, as nginx's so_keepalive: off, on (the "
        "kernel's timings) or IDLE:INTERVAL:COUNT (e.g. 60:10:5 probes after 60 s idle, every "
        "10 s, and drops the connection after 5 unanswered; empty parts: the kernel's).")
    tcp_user_timeout: float = setting(
        0.0, Seconds(off_at_zero=True),
        "Drop an accepted connection whose sent data the peer has not acknowledged for this "
        "long (TCP_USER_TIMEOUT; HAProxy's tcp-ut); 0 leaves the kernel's retries (minutes).")
    rcvbuf: int = setting(
        0, Count(0, INT_MAX // 2, "bytes (0: kernel default)"),
        "The receive buffer of each accepted socket (SO_RCVBUF; nginx's rcvbuf); 0 leaves "
        "the kernel's default and autotuning.")
    sndbuf: int = setting(
        0, Count(0, INT_MAX // 2, "bytes (0: kernel default)"),
        "The send buffer of each accepted socket (SO_SNDBUF; nginx's sndbuf); 0 leaves the "
        "kernel's default and autotuning.")
    #: Serve TLS with this server-side context (None: plain TCP); the command line makes it from
    #: --certfile and --keyfile (docs/production.md).
    tls: ssl.SSLContext | None = None
    proxy_protocol: ProxyVersion = setting(  # noqa: RUF009 (a field(), made once)
        ProxyVersion.OFF, Choice(ProxyVersion, "PROXY protocol setting"),
        "Expect a PROXY protocol header (sent by HAProxy or another load balancer) before "
        "the data: off, v1, v2 or any.")
    trusted_proxies: tuple[str, ...] = setting(
        (), Networks(),
        "Networks allowed to send a PROXY header; a header from anyone else is refused. "
        "Empty trusts no TCP client (Unix-socket clients are always trusted).")
    max_connections_per_client: int = setting(
        0, Count(0, INT_MAX, "connections (0: off)"),
        "Per listener: open connections one client (an address, or an IPv6 prefix) may hold; "
        "more are reset at accept, before a byte is read (nginx limit_conn). Behind a PROXY "
        "header the client is the address it names. 0: no limit.")
    max_connection_rate_per_client: int = setting(
        0, Count(0, INT_MAX, "connections per period (0: off)"),
        "Per listener: new connections one client may open per --client-rate-period (a "
        "sliding window, HAProxy's conn_rate); more are reset at accept. 0: no limit.")
    client_rate_period: float = setting(
        1 * SECONDS, Seconds(positive=True),
        "The period of --max-connection-rate-per-client.")
    client_ipv6_prefix: int = setting(
        64, Count(1, 128, "bits"),
        "IPv6 clients in the same prefix of this length count as one client (one host or "
        "site usually holds a whole /64).")
    client_ipv4_prefix: int = setting(
        32, Count(1, 32, "bits"),
        "IPv4 clients in the same prefix of this length count as one client (32: each "
        "address on its own).")
    client_table_size: int = setting(
        16_384, Count(1, INT_MAX, "clients"),
        "Per listener: clients the per-client limits remember at most. Clients without open "
        "connections make way, least recently seen first; at least --max-connections keeps "
        "every client with an open connection in it.")
    #: The handler that serves this listener's connections (None: the server's own), so one
    #: server can speak a protocol per port. The command line sets the text ``MODULE:CLASS``
    #: of ``--listen ADDRESS=MODULE:CLASS``; each serving process imports it and puts the
    #: instance here (``workers.app.load_listener_handlers``): a ``Server`` takes instances.
    handler: Handler | str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.policy, AcceptPolicy):
            object.__setattr__(self, "policy", parse_policy(str(self.policy)))
        if self.path is not None:
            _check(bool(self.path), "path", self.path, "must not be empty (unix:PATH)")
        elif self.fd is not None:
            _check(0 <= self.fd <= INT_MAX, "fd", self.fd, "must be a descriptor number")
        else:
            _check(isinstance(self.port, int) and 0 <= self.port <= 65535, "port", self.port,
                   "must be 0-65535")
        _check_settings(self)
        _check(self.write_high_water >= self.write_low_water, "write_high_water",
               self.write_high_water, "must be >= write_low_water")
        _check(self.write_limit >= self.write_high_water, "write_limit", self.write_limit,
               "must be >= write_high_water")
        if self.path is not None and self.proxy_protocol is ProxyVersion.OFF:
            # A Unix socket's clients have no address to count by (a PROXY header gives one).
            for name in ("max_connections_per_client", "max_connection_rate_per_client"):
                _check(not getattr(self, name), name, getattr(self, name),
                       "needs a TCP listener, or a PROXY header naming the client")
        _check(not self.tcp_user_timeout or 0.001 <= self.tcp_user_timeout <= INT_MAX / 1000,
               "tcp_user_timeout", self.tcp_user_timeout,
               f"must be 0 (off) or 0.001-{INT_MAX // 1000} seconds")

    @property
    def label(self) -> str:
        """The name used in logs and statistics: ``name``, else the address."""
        return self.name or self.address

    @property
    def address(self) -> str:
        """The configured address: ``host:port``, ``[v6]:port``, ``unix:path`` or ``fd://N``."""
        if self.path is not None:
            return f"unix:{self.path}"
        if self.fd is not None:
            return f"fd://{self.fd}"
        return format_host_port(self.host, self.port)

    @property
    def description(self) -> str:
        """The address, with the name when there is one: for error messages."""
        return f"{self.address} ({self.name})" if self.name else self.address


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Settings shared by every listener of one engine."""

    engine: Engine = setting(  # noqa: RUF009 (a field(), made once)
        Engine.AUTO, Choice(Engine, "engine"),
        "The event loop: auto (the compiled engine if it is built, else epoll), compiled, "
        "epoll (portside's own, pure Python), asyncio or uvloop.")
    drain_timeout: float = setting(
        10 * SECONDS, Seconds(),
        "Graceful shutdown lets open connections finish for this long, then closes them.",
        aliases=("--graceful-timeout",))
    linger_timeout: float = setting(
        2 * SECONDS, Seconds(),
        "After closing its side, portside waits this long for the client to close its own "
        "before resetting the connection.")
    buffer_size: int = setting(
        64 * KIB, Count(1, 64 * MIB, "bytes"), "Bytes read from a connection at a time.")
    buffer_pool_max_free: int = setting(
        16, Count(0, 1_000_000, "buffers"), "Read buffers kept for reuse.")
    connection_pool_size: int = setting(
        64, Count(0, 1_000_000, "connections"),
        "Connection objects made at start-up, ready for the first clients.")
    connection_pool_max_free: int = setting(
        1024, Count(0, 1_000_000, "connections"), "Closed connection objects kept for reuse.")
    accept_backoff: float = setting(
        0.1 * SECONDS, Seconds(),
        "When the process runs out of file descriptors (EMFILE) or memory, accepting pauses "
        "this long before it tries again.")
    log_connections: bool = setting(
        False, Switch(),
        "Log one line per closed connection: client, listener, duration, bytes each way and "
        "why it closed.")

    def __post_init__(self) -> None:
        _check_settings(self)


@dataclass(frozen=True, slots=True)
class ProcessConfig:
    """Settings of the ``portside`` command's process: listeners, workers, logs, TLS files."""

    listen: tuple[str, ...] = setting(
        (), Listens(),
        "Listen here (repeatable): [POLICY@]HOST:PORT, [POLICY@][V6ADDR]:PORT, :PORT "
        "(127.0.0.1), unix:PATH or fd://N (an inherited socket). POLICY is immediate (hand "
        "over at once, the default) or data-first (only once the client has sent bytes). "
        "Echo listens on data-first@127.0.0.1:5001 and immediate@127.0.0.1:5002, resp on "
        "127.0.0.1:6380, unless this is given. ADDRESS=MODULE:CLASS serves that listener with "
        "its own handler class (e.g. :6379=portside.examples.resp:RespHandler); the others "
        "get the command's.",
        aliases=("--bind", "-b"), repeatable=True, default_text="the command's own")
    workers: int | None = setting(
        None, Workers(),
        "Run this many worker processes under a supervisor (auto: one per CPU). Without it, "
        "one process serves and there are no reloads.", aliases=("-w",),
        default_text="one process")
    app_dir: str = setting(
        ".", Text("DIR", optional=False),
        "serve: import MODULE:CLASS from this directory (like uvicorn's --app-dir).")
    control: str | None = setting(
        None, Text("PATH"),
        "The control socket that portside ctl and portside top talk to.",
        default_text="PID.sock in a private directory: $XDG_RUNTIME_DIR/portside or "
                     "/tmp/portside-UID")
    certfile: str | None = setting(
        None, Text("FILE"),
        "Serve TLS on every listener with this certificate chain (PEM).",
        aliases=("--tls-cert", "--ssl-certfile"), default_text="plain TCP")
    keyfile: str | None = setting(
        None, Text("FILE"), "The certificate's private key (PEM).", default_text="none",
        aliases=("--tls-key", "--ssl-keyfile"))
    tls_alpn: str | None = setting(
        None, Text("PROTOCOLS"),
        "ALPN protocols offered in the TLS handshake, comma-separated (e.g. h2,http/1.1).",
        default_text="none")
    metrics: str | None = setting(
        None, Address(),
        "Serve Prometheus metrics at http://HOST:PORT/metrics (:PORT is 127.0.0.1:PORT).",
        default_text="off")
    heartbeat_timeout: float = setting(
        10 * SECONDS, Seconds(positive=True),
        "With --workers: a worker whose loop has not answered for this long is replaced.")
    upgrade_timeout: float = setting(
        60 * SECONDS, Seconds(positive=True),
        "With --workers: an upgrade (USR2) whose new supervisor is not serving within this "
        "long is given up (the new one is stopped) and the old one serves on.")
    log_level: LogLevel = setting(  # noqa: RUF009 (a field(), made once)
        LogLevel.INFO, Choice(LogLevel, "log level"), "The least important log lines written.")
    log_format: LogFormat = setting(  # noqa: RUF009 (a field(), made once)
        LogFormat.TEXT, Choice(LogFormat, "log format"),
        "text (time [pid] level logger: message) or json (one object per line).")

    def __post_init__(self) -> None:
        _check_settings(self)


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """The relay example's own settings (``portside relay``; examples/relay.py), under
    HAProxy's names where it has one. Not in ``CONFIG_CLASSES``: only the relay command has
    these flags; its ``PORTSIDE_<NAME>`` variables carry them to every worker. Checked by the
    relay (``relay.relay_config``), where an upstream list is parsed."""

    upstream: str = setting(
        "", Text("HOST:PORT[,HOST:PORT...]", optional=False),
        "The servers to forward to, round robin ([V6]:PORT and unix:PATH too).",
        default_text="required")
    send_proxy: str = setting(
        "off", Text("off|v1|v2", optional=False),
        "Send a PROXY protocol header naming the client to the upstream first (HAProxy's "
        "send-proxy / send-proxy-v2).")
    upstream_tls: bool = setting(
        False, Switch(),
        "Speak TLS to the upstreams (stunnel's client mode; HAProxy's ssl on a server line); "
        "the PROXY header (--send-proxy) goes first, in the clear, as HAProxy sends it.")
    upstream_ca: str | None = setting(
        None, Text("FILE"),
        "With --upstream-tls: trust the upstream certificates this CA bundle (PEM) signed "
        "(HAProxy's ca-file).", default_text="the system's CAs")
    upstream_sni: str | None = setting(
        None, Text("NAME"),
        "With --upstream-tls: the name sent as SNI and checked in the upstream's certificate "
        "(HAProxy's sni and verifyhost).", default_text="each upstream's host")
    upstream_verify: bool = setting(
        True, Switch(),
        "With --upstream-tls: verify the upstream's certificate and name; "
        "--no-upstream-verify encrypts without checking who answers (HAProxy's verify none).")
    connect_timeout: float = setting(
        5 * SECONDS, Seconds(positive=True),
        "Give up on an upstream that has not answered within this long, TLS handshake "
        "included (HAProxy's timeout connect); the connect is retried (--retries).")
    retries: int = setting(
        3, Count(0, 100, "connects"),
        "After a failed connect, try this many more times before closing the client "
        "(HAProxy's retries).")
    redispatch: bool = setting(
        True, Switch(),
        "Retries go to the next upstream in rotation rather than the same one (HAProxy's "
        "option redispatch).")
    check_interval: float = setting(
        0.0, Seconds(off_at_zero=True),
        "Active health checks: a TCP connect to each upstream this often (HAProxy's check "
        "inter); --fall failures in a row take it out of rotation, --rise successes put it "
        "back. 0: no checks, every upstream stays in rotation.")
    check_timeout: float = setting(
        2 * SECONDS, Seconds(positive=True),
        "A health check's connect fails after this long (HAProxy's timeout check).")
    rise: int = setting(
        2, Count(1, 1000, "checks"),
        "Successful checks in a row that put a down upstream back (HAProxy's rise).")
    fall: int = setting(
        3, Count(1, 1000, "checks"),
        "Failed checks in a row that take an upstream out of rotation (HAProxy's fall).")
    tunnel_timeout: float = setting(
        3600 * SECONDS, Seconds(off_at_zero=True),
        "Close a client and its upstream after this long with no byte either way (HAProxy's "
        "timeout tunnel); 0: never.")
    client_fin_timeout: float = setting(
        30 * SECONDS, Seconds(off_at_zero=True),
        "Once the client has half-closed (sent its FIN), close the pair after this long with "
        "no byte either way (HAProxy's timeout client-fin); 0: only --tunnel-timeout.")
    server_fin_timeout: float = setting(
        30 * SECONDS, Seconds(off_at_zero=True),
        "Once the upstream has half-closed, close the pair after this long with no byte "
        "either way (HAProxy's timeout server-fin); 0: only --tunnel-timeout.")
    max_upstream_connections: int = setting(
        0, Count(0, INT_MAX, "connections (0: as the listeners)"),
        "Upstream connections (connecting, open or closing) the relay holds at most; a client "
        "arriving at the limit is closed at once. 0: the sum of the listeners' "
        "--max-connections.")


CONFIG_CLASSES: tuple[type[Any], ...] = (ProcessConfig, ListenerConfig, ServerConfig)


_SETTINGS: dict[type[Any], tuple[Setting, ...]] = {}


def settings_of(cls: type[Any]) -> tuple[Setting, ...]:
    """The declared settings of one config class, in declaration order, names filled in."""
    known = _SETTINGS.get(cls)
    if known is not None:
        return known
    found = []
    for item in fields(cls):
        declared = item.metadata.get("setting")
        if declared is not None:
            found.append(Setting(declared.kind, declared.help, declared.aliases,
                                 declared.repeatable, declared.default_text, item.name))
    known = _SETTINGS[cls] = tuple(found)
    return known


def default_of(cls: type[Any], name: str) -> Any:
    """The declared default of a config field."""
    for item in fields(cls):
        if item.name == name:
            return item.default
    raise KeyError(name)


# -- shared value parsers -------------------------------------------------------------------------


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (127.0.0.1) as (host, port); ports 0-65535."""
    host, colon, port_text = text.rpartition(":")
    if not colon:
        raise ConfigError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") != host.endswith("]"):
        raise ConfigError(f"unbalanced brackets in {text!r} (write [V6ADDR]:PORT)")
    host = host[1:-1] if host.startswith("[") else host
    if ":" in host and not text.startswith("["):
        raise ConfigError(f"write an IPv6 address in brackets: [{host}]:{port_text}")
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ConfigError(f"port must be 0-65535, got {port_text!r} in {text!r}")
    return host or str(default_of(ListenerConfig, "host")), port


def format_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def address_label(address: object) -> str:
    """A socket address as logs, ``ctl`` and ``top`` show it, the one format for them all:
    ``host:port`` (``[v6]:port``) for TCP, the path for a Unix socket (``@name`` for an
    abstract one, as ``ss`` shows it), "unix peer" for an unnamed one, "-" for none. A peer
    chooses its path, so it is escaped (``text.printable``): no control character reaches a
    terminal or forges a log line."""
    if address is None:
        return "-"
    if isinstance(address, tuple) and len(address) >= 2:
        return format_host_port(printable(str(address[0])), address[1])
    if isinstance(address, (bytes, bytearray)):
        return "@" + printable(bytes(address[1:])) if address else "unix peer"
    return printable(str(address)) if address else "unix peer"


# MODULE:CLASS after the last "=" of a --listen value: dotted identifiers, so a Unix path
# that happens to hold "=" is not mistaken for one.
_HANDLER_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def parse_listen(text: str) -> ListenerConfig:
    """``[POLICY@]HOST:PORT``, ``[POLICY@][V6]:PORT``, ``[POLICY@]:PORT``,
    ``[POLICY@]unix:PATH`` or ``[POLICY@]fd://N`` as a listener with default settings, each
    optionally followed by ``=MODULE:CLASS``, the handler that serves it (kept as text)."""
    address_text, equals, spec = text.rpartition("=")
    if not equals or not _HANDLER_SPEC.fullmatch(spec):
        address_text, spec = text, ""
    policy_text, _, address = address_text.rpartition("@")
    policy = parse_policy(policy_text) if policy_text else AcceptPolicy.IMMEDIATE
    handler = spec or None
    if address.startswith("unix:"):
        if not address[5:]:
            raise ConfigError(f"empty path in {text!r} (write unix:PATH)")
        return ListenerConfig(path=address[5:], policy=policy, handler=handler)
    if address.startswith("fd://"):
        if not address[5:].isdigit():
            raise ConfigError(f"expected fd://N with a descriptor number, got {text!r}")
        return ListenerConfig(fd=int(address[5:]), policy=policy, handler=handler)
    host, port = parse_host_port(address)
    return ListenerConfig(host=host, port=port, policy=policy, handler=handler)


def parse_policy(text: str) -> AcceptPolicy:
    try:
        return AcceptPolicy(text.replace("_", "-").lower())
    except ValueError:
        choices = ", ".join(p.value for p in AcceptPolicy)
        raise ConfigError(f"unknown accept policy {text!r} (choose from {choices})") from None


def _check_settings(config: Any) -> None:
    """Coerce (text, lists) and check every declared setting of ``config``."""
    for declared in settings_of(type(config)):
        value = getattr(config, declared.name)
        kind = declared.kind
        if isinstance(value, (str, list, int)) and not isinstance(value, bool):
            try:
                coerced = kind.coerce(value)
            except (ValueError, ConfigError) as exc:
                message = str(exc)
                raise ConfigError(message if message.startswith("unknown ")
                                  else f"{declared.name} {message}") from None
            if coerced is not value:
                object.__setattr__(config, declared.name, coerced)
                value = coerced
        rule = kind.check(value)
        if rule is not None:
            raise ConfigError(f"{declared.name} {rule}, got {value!r}")


def _check(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{name} {rule}, got {value!r}")
