"""portside: reusable, high-performance TCP and Unix-socket servers; override callbacks."""

from portside.config import KIB, SECONDS, AcceptPolicy, Engine, ListenerConfig, ServerConfig
from portside.engine.buffers import PoolStatistics
from portside.engine.connection import CloseReason, Connection
from portside.errors import (
    ConfigError,
    ConnectionClosedError,
    ListenError,
    PortsideError,
    ProtocolError,
    ServerStateError,
)
from portside.handler import Handler
from portside.messages import MessageHandler
from portside.protocols.framing import Framer, LengthPrefixFramer, LineFramer
from portside.server import Server, ServerState
from portside.statistics import ConnectionCounters, ListenerStatistics, ServerStatistics
from portside.streams import StreamHandler, StreamReader, StreamWriter

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
    "Framer",
    "Handler",
    "LengthPrefixFramer",
    "LineFramer",
    "ListenError",
    "ListenerConfig",
    "ListenerStatistics",
    "MessageHandler",
    "PoolStatistics",
    "PortsideError",
    "ProtocolError",
    "Server",
    "ServerConfig",
    "ServerState",
    "ServerStateError",
    "ServerStatistics",
    "StreamHandler",
    "StreamReader",
    "StreamWriter",
]
