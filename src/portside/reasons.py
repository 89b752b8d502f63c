"""Why a connection closed and why a listener stopped or started accepting: the reasons the
handler callbacks are given, public, and importable without the engine (which uses the same
members)."""

from __future__ import annotations

import enum


class CloseReason(enum.Enum):
    """Why a connection closed; passed to ``Handler.connection_closed``."""

    CLOSED = "closed"  #: the handler called close(): writes flushed, then FIN
    ABORTED = "aborted"  #: the handler called abort(): RST, unsent bytes dropped
    RESET = "reset"  #: the peer reset the connection
    PEER_EOF = "peer-eof"  #: the peer closed before sending anything (data-first, never made)
    FIRST_DATA_TIMEOUT = "first-data-timeout"  #: data-first: silent past first_data_timeout
    EVICTED = "evicted"  #: pending and stale while the listener was at max_connections
    SHUTDOWN = "shutdown"  #: closed by the server's shutdown
    HANDLER_ERROR = "handler-error"  #: a handler callback raised
    PROTOCOL_ERROR = "protocol-error"  #: the peer broke the wire protocol (a framing error)
    IDLE_TIMEOUT = "idle-timeout"  #: no bytes either way for idle_timeout
    READ_TIMEOUT = "read-timeout"  #: the rest of a message did not come within read_timeout
    WRITE_TIMEOUT = "write-timeout"  #: the peer took none of our bytes for write_timeout
    TLS_ERROR = "tls-error"  #: the TLS handshake failed, or a TLS record was bad
    SOCKET_ERROR = "socket-error"  #: the operating system reported an error on the socket
    OUTPUT_LIMIT = "output-limit"  #: queued output passed the listener's write_limit
    PEER_TIMEOUT = "peer-timeout"  #: keepalive or tcp_user_timeout found the peer gone
    REFUSED = "refused"  #: refused by a trust or admission rule (say, an untrusted PROXY source)
    #: refused by a per-client limit: max_connections_per_client or the connection rate
    CLIENT_LIMIT = "client-limit"
    # The relay's (examples/relay.py), HAProxy's answers for a TCP tunnel:
    NO_UPSTREAM = "no-upstream"  #: closed at once: every upstream is down or failed to connect
    UPSTREAM_LIMIT = "upstream-limit"  #: closed at once: the relay holds its upstream maximum
    TUNNEL_TIMEOUT = "tunnel-timeout"  #: no byte either way for the relay's tunnel_timeout
    FIN_TIMEOUT = "fin-timeout"  #: one side half-closed, then silence past client/server_fin


class AcceptingReason(enum.Enum):
    """Why a listener stopped or started accepting (``Handler.accepting_stopped`` and
    ``accepting_started``; the article's OnStopAcceptingConnections / OnStart...)."""

    #: Stopped: ``Server.pause_accepting``.
    PAUSED = "paused"
    #: Stopped: ``max_connections`` open.
    CEILING = "ceiling"
    #: Stopped: accept() ran out of a resource (EMFILE, ENFILE, ENOBUFS, ENOMEM); retried
    #: after ``accept_backoff``.
    BACKOFF = "backoff"
    #: Stopped: the listener closed (shutdown or reload).
    SHUTDOWN = "shutdown"
    #: Stopped: accept() failed in a way that means the listening socket is broken (logged).
    ERROR = "error"
    #: Started: the first time.
    START = "start"
    #: Started: ``Server.resume_accepting``.
    RESUMED = "resumed"
    #: Started: a connection closed (or the ceiling was raised) below ``max_connections``.
    BELOW_CEILING = "below-ceiling"
    #: Started: the back-off after a capacity error is over (accept() is tried again).
    BACKOFF_OVER = "backoff-over"
