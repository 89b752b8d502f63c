"""The exception tree: every error portside raises on purpose derives from PortsideError."""

from __future__ import annotations

import enum


class PortsideError(Exception):
    """Base of every error portside raises deliberately."""


class ConfigError(PortsideError, ValueError):
    """A setting has a value portside cannot use (bad port, negative timeout, unknown engine)."""


class ListenError(PortsideError, OSError):
    """A listener could not be created: the address is in use, or cannot be bound."""


class ServerStateError(PortsideError, RuntimeError):
    """The server was asked to do something its lifecycle does not allow (run twice, say)."""


class ConnectionClosedError(PortsideError, ConnectionError):
    """A write or other action was attempted on a connection that is closing or closed."""


class ProtocolError(PortsideError, ValueError):
    """A peer broke the wire protocol: an oversized or malformed frame, a bad header.

    Raised by the sans-IO parsers; the server closes the offending connection with a log line.
    """


class ControlError(PortsideError):
    """The control socket could not be used: no server there, several to choose from, a
    directory or peer that fails the ownership checks, or the server's error reply."""


class ErrorOrigin(enum.Enum):
    """Where an error reported to ``Handler.error`` came from: the handler's own code, or
    portside's (so a bug in portside's PROXY or TLS layer is never taken for the handler's)."""

    CALLBACK = "callback"  #: a handler callback raised (data_received, connection_made, ...)
    OFFLOAD = "offload"  #: MessageHandler: offloaded work's completion, or offload_failed, raised
    SOCKET_HOOK = "socket-hook"  #: Handler.socket_accepted raised (the connection was reset)
    READ = "read"  #: the operating system failed a read, or the engine's read path raised
    WRITE = "write"  #: the operating system failed a send
    PROXY = "proxy-header"  #: portside's PROXY-protocol layer raised (a bad header is no error)
    TLS = "tls"  #: portside's TLS layer raised (a failed handshake or bad record is no error)
