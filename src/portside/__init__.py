"""portside: reusable, high-performance TCP and Unix-socket servers; override callbacks.

The public API, re-exported here. The names are imported when first used (PEP 562), so that a
light command such as ``portside ctl``, which imports ``portside.cli``, does not pay for the
server and its engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from portside.config import KIB, SECONDS, AcceptPolicy, Engine, ListenerConfig, ServerConfig
    from portside.connection import ConnectAttempt, Connection, ListenerView, RateLimitedLog
    from portside.engine.buffers import PoolStatistics
    from portside.errors import (
        ConfigError,
        ConnectionClosedError,
        ErrorOrigin,
        ListenError,
        PortsideError,
        ProtocolError,
        ServerStateError,
    )
    from portside.handler import Handler
    from portside.messages import MessageHandler
    from portside.protocols.framing import Framer, LengthPrefixFramer, LineFramer
    from portside.reasons import AcceptingReason, CloseReason
    from portside.server import IOPool, Server, ServerState
    from portside.statistics import (
        ConnectionCounters,
        ListenerStatistics,
        OutboundStatistics,
        ServerStatistics,
    )
    from portside.streams import StreamHandler, StreamReader, StreamWriter

_WHERE = {
    "KIB": "config", "SECONDS": "config", "AcceptPolicy": "config", "Engine": "config",
    "ListenerConfig": "config", "ServerConfig": "config",
    "PoolStatistics": "engine.buffers",
    "CloseReason": "reasons", "Connection": "connection",
    "AcceptingReason": "reasons", "ErrorOrigin": "errors",
    "ConnectAttempt": "connection", "ListenerView": "connection",
    "RateLimitedLog": "connection",
    "ConfigError": "errors", "ConnectionClosedError": "errors", "ListenError": "errors",
    "PortsideError": "errors", "ProtocolError": "errors", "ServerStateError": "errors",
    "Handler": "handler",
    "MessageHandler": "messages",
    "Framer": "protocols.framing", "LengthPrefixFramer": "protocols.framing",
    "LineFramer": "protocols.framing",
    "IOPool": "server", "Server": "server", "ServerState": "server",
    "ConnectionCounters": "statistics", "ListenerStatistics": "statistics",
    "OutboundStatistics": "statistics",
    "ServerStatistics": "statistics",
    "StreamHandler": "streams", "StreamReader": "streams", "StreamWriter": "streams",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'portside' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"portside.{module}"), name)
    globals()[name] = value  # once imported, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


__all__ = [
    "KIB",
    "SECONDS",
    "AcceptPolicy",
    "AcceptingReason",
    "CloseReason",
    "ConfigError",
    "ConnectAttempt",
    "Connection",
    "ConnectionClosedError",
    "ConnectionCounters",
    "Engine",
    "ErrorOrigin",
    "Framer",
    "Handler",
    "IOPool",
    "LengthPrefixFramer",
    "LineFramer",
    "ListenError",
    "ListenerConfig",
    "ListenerStatistics",
    "ListenerView",
    "MessageHandler",
    "OutboundStatistics",
    "PoolStatistics",
    "PortsideError",
    "ProtocolError",
    "RateLimitedLog",
    "Server",
    "ServerConfig",
    "ServerState",
    "ServerStateError",
    "ServerStatistics",
    "StreamHandler",
    "StreamReader",
    "StreamWriter",
]
