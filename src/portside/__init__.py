"""portside: reusable, high-performance TCP and Unix-socket servers; override callbacks."""

from portside.config import KIB, SECONDS, AcceptPolicy, Engine, ListenerConfig, ServerConfig
from portside.engine.buffers import PoolStatistics
from portside.engine.connection import CloseReason, Connection
from portside.errors import (
    ConfigError,
    ConnectionClosedError,
    ListenError,
    PortsideError,
    ServerStateError,
)
from portside.handler import Handler
from portside.server import Server, ServerState
from portside.statistics import ConnectionCounters, ListenerStatistics, ServerStatistics

__all__ = [
    "KIB",
    "SECONDS",
    "AcceptPolicy",
    "CloseReason",
    "ConfigError",
    "Connection",
    "ConnectionClosedError",
    "ConnectionCounters",
    "Engine",
    "Handler",
    "ListenError",
    "ListenerConfig",
    "ListenerStatistics",
    "PoolStatistics",
    "PortsideError",
    "Server",
    "ServerConfig",
    "ServerState",
    "ServerStateError",
    "ServerStatistics",
]
