"""A connection's states and close reasons: shared by the connection, its TLS session and the
compiled engine, and importable without them."""

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


class State(enum.IntEnum):
    PENDING = 0
    OPEN = 1
    CLOSING = 2
    LINGERING = 3
    CLOSED = 4


PENDING, OPEN, CLOSING, LINGERING, CLOSED = (
    State.PENDING, State.OPEN, State.CLOSING, State.LINGERING, State.CLOSED)


def count_close(tally: dict[str, int], reason: CloseReason | None) -> None:
    """One more close in a closed-by-reason tally ("closed" when none was recorded). Reads
    the member's ``_value_`` field: ``.value`` is a Python-level property, a frame per close."""
    name = reason._value_ if reason is not None else "closed"
    tally[name] = tally.get(name, 0) + 1
