"""A connection's states and close reasons, and the engines' shared constants: the one home of
each, for the connection, its TLS session and the compiled engine, importable without them.

The compiled engine takes ``State``, the accept errno sets and ``SENDMSG_BATCH`` from here at
build time: setup.py writes them into ``_constants.pxi`` (C constants, no lookup at run time),
and ``tests/test_engine_differential.py`` checks the built module agrees value by value."""

from __future__ import annotations

import enum
import errno


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


# The states as plain names for the hot paths (an IntEnum compares as an int).
PENDING, OPEN, CLOSING, LINGERING, CLOSED = (
    State.PENDING, State.OPEN, State.CLOSING, State.LINGERING, State.CLOSED)

#: accept() errors that mean "out of a resource right now": retry later, never spin, never die.
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: accept() errors about one connection that died in the backlog: skip it, accept the next.
SKIP_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN,
                         errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH,
                         errno.EOPNOTSUPP, errno.ENETUNREACH})
#: Buffers per sendmsg (writev) call; far below IOV_MAX (1024 on Linux).
SENDMSG_BATCH = 64


def count_close(tally: dict[str, int], reason: CloseReason | None) -> None:
    """One more close in a closed-by-reason tally ("closed" when none was recorded): the one
    tally of both engines (the compiled listener calls it, once per close). Reads the member's
    ``_value_`` field: ``.value`` is a Python-level property, a frame per close."""
    name = reason._value_ if reason is not None else "closed"
    tally[name] = tally.get(name, 0) + 1
