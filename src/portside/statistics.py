"""Frozen snapshots of what a server is doing, as ``Server.statistics()`` returns them."""

from __future__ import annotations

from dataclasses import dataclass

from portside.engine.buffers import PoolStatistics

TTFB_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, float("inf"))


@dataclass(frozen=True, slots=True)
class ListenerStatistics:
    """Counters of one listener. ``pending`` + ``active`` are its open connections now."""

    name: str
    address: str
    policy: str
    accepting: bool
    accepted: int
    pending: int
    active: int
    closed: int
    first_data_timeouts: int
    evicted: int
    limited: int
    accept_errors: int
    proxy_errors: int
    tls_failures: int
    idle_timeouts: int
    read_timeouts: int
    write_timeouts: int
    bytes_in: int
    bytes_out: int
    #: Closed connections by close reason (``CloseReason`` values, such as "closed", "reset",
    #: "first-data-timeout"); only reasons seen so far appear.
    closed_by_reason: dict[str, int]
    #: Time from accept to a connection's first byte: counts per ``TTFB_BUCKETS`` upper bound
    #: (the last is +Inf), their sum in seconds, and how many.
    ttfb_buckets: tuple[int, ...]
    ttfb_sum: float
    ttfb_count: int
    #: TCP connections refused at accept on a PROXY-protocol listener because their source is
    #: not in ``trusted_proxies`` (also in ``closed_by_reason["refused"]``).
    proxy_refused: int = 0


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

    @property
    def active(self) -> int:
        return sum(listener.active for listener in self.listeners)

    @property
    def pending(self) -> int:
        return sum(listener.pending for listener in self.listeners)


@dataclass(frozen=True, slots=True)
class ConnectionCounters:
    """What one connection has done so far."""

    bytes_in: int
    bytes_out: int
    write_buffer_size: int
    age: float
