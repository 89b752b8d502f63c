"""A connection's states and close reasons, and the engines' shared constants: the one home of
each, for the connection, its TLS session and the compiled engine, importable without them.

The compiled engine takes ``State``, the accept errno sets and ``SENDMSG_BATCH`` from here at
build time: setup.py writes them into ``_constants.pxi`` (C constants, no lookup at run time),
and ``tests/test_engine_differential.py`` checks the built module agrees value by value."""

from __future__ import annotations

import enum
import errno

from portside.reasons import CloseReason

__all__ = ["CLOSED", "CLOSING", "LINGERING", "OPEN", "PENDING", "CloseReason", "State",
           "count_close"]


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
