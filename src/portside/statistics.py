"""Frozen snapshots of what a server is doing, and the one declaration of every figure in them.

Each field of ``ListenerStatistics`` and ``WorkerStatistics`` carries a ``Figure`` (in the
field's metadata): what kind of figure it is, its help text, and how it is shown. The ``ctl
stats`` document (``control.target``), the Prometheus families (``metrics``) and the columns of
``portside top`` are all derived from these declarations, so a figure is named and described in
one place. A field added without a ``Figure`` still appears everywhere: a whole number as a
counter named after the field, anything else as a label.
"""

from __future__ import annotations

import dataclasses
import os
import resource
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from portside.engine.buffers import PoolStatistics

TTFB_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, float("inf"))

Kind = Literal["label", "state", "counter", "gauge", "reasons", "histogram", "part"]
Merge = Literal["sum", "max", "same", "states", "buckets", "reasons"]


@dataclass(frozen=True)
class Figure:
    """How one statistic is summed, exported and shown.

    ``kind``: label (identifies the row), state (a word such as "paused"), counter (only
    grows), gauge (goes up and down), reasons (counts by a reason), histogram (bucket counts;
    its sum and count are ``part`` figures). ``metric``: the Prometheus family, ``portside_``
    plus the field name unless given ("" for none); ``labels`` put several fields into one
    family (``portside_timeouts_total{kind="idle"}``). ``column``/``short``: the header in
    ``portside top`` (wide/narrow), ``rate`` shows it per second, ``priority`` orders which
    columns stay when the terminal is narrow (lower stays longer). ``deprecated``: the
    family's former name, still exported as an alias for one release (docs/metrics.md).

    Family names follow the Prometheus naming guide: the unit in the name, plural
    (``_bytes``, ``_seconds``), and ``_total`` on every counter (added on export).
    """

    kind: Kind
    help: str
    metric: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    column: str | None = None
    short: str | None = None
    rate: bool = False
    priority: int = 50
    merge: Merge | None = None
    deprecated: str | None = None

    @property
    def merged_by(self) -> Merge:
        if self.merge is not None:
            return self.merge
        return {"label": "same", "state": "states", "reasons": "reasons",
                "histogram": "buckets"}.get(self.kind, "sum")  # type: ignore[return-value]


def figure(kind: Kind, help: str, **options: Any) -> dict[str, Figure]:
    """Field metadata declaring a ``Figure``: ``x: int = field(metadata=figure(...))`` (a
    ``field()`` without a default: the class is still built by keyword)."""
    return {"figure": Figure(kind, help, **options)}


@dataclass(frozen=True, slots=True)
class ListenerStatistics:
    """Counters of one listener. ``pending`` + ``active`` are its open connections now."""

    name: str = field(metadata=figure(
        "label", "The listener's name.", column="listener", short="lsn", priority=0))
    address: str = field(metadata=figure(
        "label", "Where it listens.", column="address", short="addr", priority=60))
    policy: str = field(metadata=figure(
        "label", "immediate or data-first.", column="policy", priority=90))
    accepting: bool = field(metadata=figure(
        "gauge", "1 while the listener accepts connections.", metric="listener_accepting",
        merge="max"))
    #: "accepting", "paused", "at-ceiling", "backing-off" or "closed".
    accept_state: str = field(metadata=figure(
        "state", "accepting, paused, at-ceiling, backing-off or closed.", column="state",
        short="st", priority=5))
    max_connections: int = field(metadata=figure(
        "gauge", "The listener's max_connections (summed over workers).", column="limit",
        short="lim", priority=9))
    peak_connections: int = field(metadata=figure(
        "gauge", "The most connections open at once so far (summed over workers).",
        column="peak", priority=12))
    accepted: int = field(metadata=figure(
        "counter", "Connections accepted from the kernel.", column="accepted", short="acc",
        priority=18))
    pending: int = field(metadata=figure(
        "gauge", "Open connections: pending (waiting for first data) or active (handed to the "
        "handler).", metric="connections", labels=(("state", "pending"),), column="pending",
        short="pend", priority=17))
    active: int = field(metadata=figure(
        "gauge", "Open connections: pending (waiting for first data) or active (handed to the "
        "handler).", metric="connections", labels=(("state", "active"),), column="active",
        short="act", priority=16))
    closed: int = field(metadata=figure(
        "counter", "Connections closed, for any reason (the sum of portside_closed_total).",
        metric=""))
    first_data_timeouts: int = field(metadata=figure(
        "counter", "Connections closed by a timeout.", metric="timeouts",
        labels=(("kind", "first_data"),), column="1st-data t/o", short="1st", priority=40))
    evicted: int = field(metadata=figure(
        "counter", "Silent pending connections closed to make room at the ceiling.",
        column="evicted", short="evict", priority=45))
    limited: int = field(metadata=figure(
        "counter", "Times the listener reached max_connections and stopped accepting.",
        column="limited", short="ltd", priority=55))
    accept_errors: int = field(metadata=figure(
        "counter", "accept() failures (EMFILE and the like).", column="accept err",
        short="aerr", priority=50))
    proxy_errors: int = field(metadata=figure(
        "counter", "Connections refused for a bad PROXY header.", column="proxy err",
        short="perr", priority=65))
    tls_failures: int = field(metadata=figure(
        "counter", "TLS handshakes that failed and bad TLS records.", column="tls fail",
        short="tls", priority=66))
    idle_timeouts: int = field(metadata=figure(
        "counter", "Connections closed by a timeout.", metric="timeouts",
        labels=(("kind", "idle"),), column="idle t/o", short="idle", priority=70))
    read_timeouts: int = field(metadata=figure(
        "counter", "Connections closed by a timeout.", metric="timeouts",
        labels=(("kind", "read"),), column="read t/o", short="rd", priority=71))
    write_timeouts: int = field(metadata=figure(
        "counter", "Connections closed by a timeout.", metric="timeouts",
        labels=(("kind", "write"),), column="write t/o", short="wr", priority=72))
    bytes_in: int = field(metadata=figure(
        "counter", "Bytes read from clients.", column="in kB/s", short="in k/s", rate=True,
        priority=25, metric="received_bytes", deprecated="bytes_in"))
    bytes_out: int = field(metadata=figure(
        "counter", "Bytes written to clients.", column="out kB/s", short="out k/s", rate=True,
        priority=26, metric="sent_bytes", deprecated="bytes_out"))
    #: Closed connections by close reason (``CloseReason`` values, such as "closed", "reset",
    #: "first-data-timeout"); only reasons seen so far appear.
    closed_by_reason: dict[str, int] = field(metadata=figure(
        "reasons", "Connections closed, by close reason.", metric="closed"))
    #: Time from accept to a connection's first byte: counts per ``TTFB_BUCKETS`` upper bound
    #: (the last is +Inf), their sum in seconds, and how many.
    ttfb_buckets: tuple[int, ...] = field(metadata=figure(
        "histogram", "From accept to a connection's first byte.",
        metric="time_to_first_byte_seconds"))
    ttfb_sum: float = field(metadata=figure(
        "part", "Sum of the times to first byte, in seconds."))
    ttfb_count: int = field(metadata=figure(
        "part", "How many times to first byte were measured."))
    #: TCP connections refused at accept on a PROXY-protocol listener because their source is
    #: not in ``trusted_proxies`` (also in ``closed_by_reason["refused"]``).
    proxy_refused: int = field(default=0, metadata=figure(
        "counter", "Connections refused at accept: a PROXY header from an untrusted source."))
    #: Connections refused by a per-client limit (max_connections_per_client or
    #: max_connection_rate_per_client): reset at accept, or once their PROXY header named the
    #: client (also in ``closed_by_reason["client-limit"]``).
    client_refused: int = field(default=0, metadata=figure(
        "counter", "Connections refused by a per-client limit (open connections or rate).",
        column="client rej/s", short="crej/s", rate=True, priority=46))
    #: Clients the per-client limits track now (at most client_table_size per listener and
    #: process).
    clients_tracked: int = field(default=0, metadata=figure(
        "gauge", "Clients the per-client limits are tracking now.", column="clients",
        short="cli", priority=47))


@dataclass(frozen=True, slots=True)
class OutboundStatistics:
    """Counters of one engine's outbound connections (``Server.connect``) under one set of
    policies, counted apart from every listener's."""

    name: str = field(metadata=figure(
        "label", "The outbound policies' name (\"outbound\" unless given).", column="outbound",
        short="out", priority=0))
    connecting: int = field(metadata=figure(
        "gauge", "Outbound connects under way.", metric="outbound_connecting",
        column="connecting", short="cing", priority=20))
    active: int = field(metadata=figure(
        "gauge", "Open outbound connections.", metric="outbound_connections", column="active",
        short="act", priority=10))
    connected: int = field(metadata=figure(
        "counter", "Outbound connects that succeeded.", metric="outbound_connected",
        column="connected", short="conn", priority=15))
    connect_failed: int = field(metadata=figure(
        "counter", "Outbound connects that failed: refused, unreachable, timed out, cancelled.",
        metric="outbound_connect_failed", column="failed", short="fail", priority=16))
    connect_timeouts: int = field(metadata=figure(
        "counter", "Outbound connects that passed their timeout (also in connect_failed).",
        metric="outbound_connect_timeouts", column="conn t/o", short="cto", priority=30))
    closed: int = field(metadata=figure(
        "counter", "Outbound connections closed, for any reason.", metric=""))
    idle_timeouts: int = field(metadata=figure(
        "counter", "Outbound connections closed by a timeout.", metric="outbound_timeouts",
        labels=(("kind", "idle"),), column="idle t/o", short="idle", priority=70))
    write_timeouts: int = field(metadata=figure(
        "counter", "Outbound connections closed by a timeout.", metric="outbound_timeouts",
        labels=(("kind", "write"),), column="write t/o", short="wr", priority=72))
    bytes_in: int = field(metadata=figure(
        "counter", "Bytes read from outbound connections.", metric="outbound_received_bytes",
        deprecated="outbound_bytes_in",
        column="in kB/s", short="in k/s", rate=True, priority=25))
    bytes_out: int = field(metadata=figure(
        "counter", "Bytes written to outbound connections.", metric="outbound_sent_bytes",
        deprecated="outbound_bytes_out",
        column="out kB/s", short="out k/s", rate=True, priority=26))
    closed_by_reason: dict[str, int] = field(metadata=figure(
        "reasons", "Outbound connections closed, by close reason.", metric="outbound_closed"))
    #: Time from ``connect`` to an established connection, per ``TTFB_BUCKETS`` upper bound.
    connect_buckets: tuple[int, ...] = field(metadata=figure(
        "histogram", "From connect() to an established outbound connection.",
        metric="outbound_connect_seconds"))
    connect_sum: float = field(metadata=figure(
        "part", "Sum of the connect times, in seconds."))
    connect_count: int = field(metadata=figure(
        "part", "How many connect times were measured."))


@dataclass(frozen=True, slots=True)
class UpstreamStatistics:
    """One upstream server of a relay (examples/relay.py): whether it is in rotation, what its
    health checks and connects found. Entries of the same ``name`` are merged over workers
    (each worker checks on its own, as HAProxy's processes did)."""

    name: str = field(metadata=figure(
        "label", "The upstream's address.", column="upstream", short="ups", priority=0))
    state: str = field(metadata=figure(
        "state", "up (in rotation) or down (taken out by its health checks).", column="state",
        short="st", priority=5))
    up: int = field(metadata=figure(
        "gauge", "1 while the upstream is in rotation (summed over workers).",
        metric="upstream_up"))
    check_status: str = field(metadata=figure(
        "state", "The last health check, as HAProxy says it: L4OK, L4CON (refused), L4TOUT "
        "(timed out), or none (no checks).", column="check", short="chk", priority=8))
    checks_passed: int = field(metadata=figure(
        "counter", "Health checks that connected.", metric="upstream_checks",
        labels=(("result", "passed"),), column="chk ok", priority=40))
    checks_failed: int = field(metadata=figure(
        "counter", "Health checks that failed.", metric="upstream_checks",
        labels=(("result", "failed"),), column="chk fail", short="chkf", priority=20))
    downs: int = field(metadata=figure(
        "counter", "Times the upstream was taken out of rotation (HAProxy's chkdown).",
        metric="upstream_downs", column="downs", priority=30))
    connecting: int = field(metadata=figure(
        "gauge", "Client connects to the upstream under way.", metric="upstream_connecting",
        column="connecting", short="cing", priority=25))
    active: int = field(metadata=figure(
        "gauge", "Open connections to the upstream (closing ones included).",
        metric="upstream_connections", column="active", short="act", priority=10))
    connected: int = field(metadata=figure(
        "counter", "Client connects to the upstream that succeeded.",
        metric="upstream_connected", column="connected", short="conn", priority=15))
    connect_failed: int = field(metadata=figure(
        "counter", "Client connects to the upstream that failed (refused, timed out).",
        metric="upstream_connect_failed", column="failed", short="fail", priority=12))
    retries: int = field(metadata=figure(
        "counter", "Connects tried again after one to this upstream failed (HAProxy's wretr).",
        metric="upstream_retries", column="retries", short="retr", priority=35))
    redispatches: int = field(metadata=figure(
        "counter", "Retries sent to another upstream after this one failed (HAProxy's wredis).",
        metric="upstream_redispatches", column="redisp", priority=36))


@dataclass(frozen=True, slots=True)
class ServerStatistics:
    """The whole engine: every listener, and the buffer and connection pools."""

    state: str
    engine: str
    accepting_paused: bool
    #: How late the loop ran a timer, last and worst, in seconds: a busy or blocked loop.
    loop_lag: float
    loop_lag_max: float
    listeners: tuple[ListenerStatistics, ...]
    buffer_pool: PoolStatistics
    connection_pool: PoolStatistics
    #: Outbound connections (``Server.connect``), by policies; empty until the first connect.
    outbound: tuple[OutboundStatistics, ...] = ()
    #: Upstream servers of a relay (``Server.add_upstream_statistics``); empty without one.
    upstreams: tuple[UpstreamStatistics, ...] = ()

    @property
    def active(self) -> int:
        return sum(listener.active for listener in self.listeners)

    @property
    def pending(self) -> int:
        return sum(listener.pending for listener in self.listeners)


@dataclass(frozen=True, slots=True)
class WorkerStatistics:
    """One process (a worker, or the single server; the supervisor reports the process
    figures of its own): its engine's state and what it holds from the operating system."""

    slot: str = field(metadata=figure(
        "label", "The worker's slot: a number its replacements keep, or 'supervisor'.",
        column="worker", short="wk", priority=0))
    pid: int = field(metadata=figure("label", "The process id.", column="pid", priority=1))
    state: str = field(metadata=figure(
        "state", "new, started, running, draining or stopped.", column="state", short="st",
        priority=5))
    uptime: float = field(metadata=figure(
        "gauge", "Seconds since the process started.", metric="worker_uptime_seconds",
        column="up s", priority=40))
    connections: int = field(metadata=figure(
        "gauge", "Open connections of the process.", metric="worker_connections",
        column="conns", priority=10))
    loop_lag: float = field(metadata=figure(
        "gauge", "How late the process's loop last ran a timer, seconds.",
        metric="worker_loop_lag_seconds", column="lag ms", priority=20))
    loop_lag_max: float = field(metadata=figure(
        "gauge", "The worst loop lag so far, seconds.", metric="worker_loop_lag_max_seconds",
        column="worst ms", priority=45))
    open_fds: int = field(metadata=figure(
        "gauge", "Open file descriptors.", metric="process_open_fds", column="fds",
        priority=30))
    max_fds: int = field(metadata=figure(
        "gauge", "The limit on open file descriptors (RLIMIT_NOFILE).",
        metric="process_max_fds", column="fd limit", short="fdmax", priority=35))
    memory_bytes: int = field(metadata=figure(
        "gauge", "Resident memory, bytes.", metric="process_resident_memory_bytes",
        column="mem MiB", short="MiB", priority=25))
    cpu_seconds: float = field(metadata=figure(
        "counter", "CPU time used, user and system, seconds.", metric="process_cpu_seconds",
        column="cpu %", rate=True, priority=15))


#: The pools' figures (``PoolStatistics`` belongs to the engine; its fields are declared here).
POOL_FIGURES: dict[str, Figure] = {
    "item_size": Figure("gauge", "Bytes per pooled buffer.", metric="", merge="same"),
    "max_free": Figure("gauge", "Free objects kept at most.", metric="", merge="same"),
    "free": Figure("gauge", "Pooled objects ready for reuse.", metric="pool_free"),
    "in_use": Figure("gauge", "Pooled objects lent out.", metric="pool_in_use"),
    "hits": Figure("counter", "Requests met from the pool.", metric="pool_hits"),
    "misses": Figure("counter", "Requests that had to allocate.", metric="pool_misses"),
    "discarded": Figure("counter", "Objects given back to a full pool and dropped.",
                        metric="pool_discarded"),
}


def figures(cls: type[Any]) -> list[tuple[str, Figure]]:
    """Every field of a statistics class with its ``Figure``, undeclared fields included."""
    found = []
    for entry in dataclasses.fields(cls):
        declared = entry.metadata.get("figure")
        if declared is None:
            kind: Kind = "counter" if entry.type in (int, "int") else "label"
            declared = Figure(kind, entry.name.replace("_", " ").capitalize() + ".")
        found.append((entry.name, declared))
    return found


def metric_name(name: str, declared: Figure) -> str:
    """The Prometheus family of a figure, without the ``_total`` a counter is shown with."""
    return "portside_" + (declared.metric if declared.metric is not None else name)


def merge(declarations: Iterable[tuple[str, Figure]],
          entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Entries of one thing seen by several workers (one listener, say), summed by the rule
    each figure declares."""
    merged: dict[str, Any] = {}
    for name, declared in declarations:
        values = [entry[name] for entry in entries if name in entry]
        if not values:
            continue
        how = declared.merged_by
        if how == "same":
            merged[name] = values[0]
        elif how == "max":
            merged[name] = max(values)
        elif how == "states":
            merged[name] = "/".join(sorted(set(map(str, values))))
        elif how == "buckets":
            merged[name] = [sum(column) for column in zip(*values, strict=True)]
        elif how == "reasons":
            reasons: dict[str, int] = {}
            for value in values:
                for reason, count in value.items():
                    reasons[reason] = reasons.get(reason, 0) + count
            merged[name] = reasons
        else:
            merged[name] = sum(values)
    return merged


def process_figures() -> dict[str, Any]:
    """This process's descriptors, memory and CPU, as ``WorkerStatistics`` names them."""
    try:
        open_fds = len(os.listdir("/proc/self/fd")) - 1  # less the one listdir holds
    except OSError:
        open_fds = -1
    try:
        with open("/proc/self/statm", "rb") as file:
            memory = int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = os.times()
    return {"open_fds": open_fds, "max_fds": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "memory_bytes": memory, "cpu_seconds": round(times.user + times.system, 3)}


@dataclass(frozen=True, slots=True)
class ConnectionCounters:
    """What one connection has done so far."""

    bytes_in: int
    bytes_out: int
    write_buffer_size: int
    age: float


class Retired:
    """What ended workers counted, kept by the supervisor so that no counter goes backwards
    when a worker exits (a crash, ``kill -9``, a reload): prometheus_client's multiprocess mode
    keeps dead processes' counters in the sum in the same way. Only counters are kept (their
    reasons, histogram buckets and sums too); gauges (open connections) describe the living
    and are kept only as zeros, so that an entry merges like a worker's.

    Its ``document`` has the shape of a worker's ``stats`` reply, minus the process, and is
    merged after the live workers' (``control.target.combine``)."""

    def __init__(self) -> None:
        self.listeners: dict[str, dict[str, Any]] = {}
        self.outbound: dict[str, dict[str, Any]] = {}
        self.upstreams: dict[str, dict[str, Any]] = {}
        self.pools: dict[str, dict[str, Any]] = {}

    def add(self, document: dict[str, Any] | None) -> None:
        """Fold in the last ``stats`` reply of a worker that has exited."""
        if not document:
            return
        for entry in document.get("listeners", ()):
            _fold(self.listeners, entry["name"], figures(ListenerStatistics), entry)
        for entry in document.get("outbound", ()):
            _fold(self.outbound, entry["name"], figures(OutboundStatistics), entry)
        for entry in document.get("upstreams", ()):
            _fold(self.upstreams, entry["name"], figures(UpstreamStatistics), entry)
        for name, pool in document.get("pools", {}).items():
            _fold(self.pools, name, POOL_FIGURES.items(), pool)

    def document(self) -> dict[str, Any]:
        return {"listeners": list(self.listeners.values()),
                "outbound": list(self.outbound.values()),
                "upstreams": list(self.upstreams.values()), "pools": dict(self.pools)}

    def total(self, name: str) -> int:
        """One listener counter summed over every listener (the supervisor's last line)."""
        return sum(int(entry.get(name, 0)) for entry in self.listeners.values())


def _kept(declared: Figure) -> Literal["label", "count", "zero"] | None:
    """How a retired worker's figure is kept: as a label, counted on, as a zero, or not."""
    if declared.kind == "label":
        return "label"
    if declared.kind in ("counter", "reasons", "histogram", "part"):
        return "count"
    if declared.kind == "gauge" and declared.merged_by == "sum":
        return "zero"
    return None  # states and max-merged gauges: only the living have one


def _fold(kept: dict[str, dict[str, Any]], key: str,
          declarations: Iterable[tuple[str, Figure]], entry: dict[str, Any]) -> None:
    held = kept.setdefault(key, {})
    for name, declared in declarations:
        if name not in entry:
            continue
        how = _kept(declared)
        if how == "label":
            held.setdefault(name, entry[name])
        elif how == "zero":
            held[name] = 0
        elif how == "count":
            held[name] = entry[name] if name not in held else \
                merge([(name, declared)], [held, entry])[name]
