"""Deadlines that share one timeout, kept in arrival order (the seed's SO_CONNECT_TIME sweep).

Every item in a ``DeadlineQueue`` gets the same timeout, so items expire in the order they were
added: a dict (which keeps insertion order) is a queue whose front is always the next to expire,
with O(1) add, discard and refresh. The owner arms one timer for ``next_due()`` rather than one
timer per connection, so ten thousand silent connections cost one timer, not ten thousand.
Pure code: the caller passes the time in, so tests need no clock or sleep.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class DeadlineQueue(Generic[K]):
    """Items that each expire ``timeout`` seconds after they were added or last refreshed."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._due: dict[K, float] = {}

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, item: object) -> bool:
        return item in self._due

    def add(self, item: K, now: float) -> None:
        """Start (or restart) ``item``'s countdown at ``now``."""
        self._due.pop(item, None)
        self._due[item] = now + self.timeout

    def discard(self, item: K) -> None:
        self._due.pop(item, None)

    def next_due(self) -> float | None:
        """When the oldest item expires, or None when the queue is empty."""
        for due in self._due.values():
            return due
        return None

    def pop_expired(self, now: float) -> list[K]:
        """Remove and return every item whose deadline is at or before ``now``, oldest first."""
        expired: list[K] = []
        for item, due in self._due.items():
            if due > now:
                break
            expired.append(item)
        for item in expired:
            del self._due[item]
        return expired

    def pop_older_than(self, age: float, now: float) -> list[K]:
        """Remove and return items added over ``age`` seconds before ``now`` (pressure sweep)."""
        return self.pop_expired(now + self.timeout - age)
