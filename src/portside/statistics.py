"""Frozen snapshots of what a server is doing, as ``Server.statistics()`` returns them."""

from __future__ import annotations

from dataclasses import dataclass

from portside.engine.buffers import PoolStatistics


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
    bytes_in: int
    bytes_out: int


@dataclass(frozen=True, slots=True)
class ServerStatistics:
    """The whole engine: every listener, and the buffer and connection pools."""

    state: str
    engine: str
    accepting_paused: bool
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
    reads: int
    writes: int
    write_buffer_size: int
    age: float
