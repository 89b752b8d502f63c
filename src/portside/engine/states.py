"""A connection's states and close reasons: shared by the connection, its TLS session and the
compiled engine, and importable without them."""

from __future__ import annotations

import enum

from portside.reasons import CloseReason

__all__ = ["CLOSED", "CLOSING", "LINGERING", "OPEN", "PENDING", "CloseReason", "State",
           "count_close"]


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
