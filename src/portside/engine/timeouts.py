"""Per-listener timeouts on one structure: a DeadlineQueue and a single timer per kind.

Every kind of timeout (first data, idle, read, write) has one fixed length per listener, so
its deadlines expire in the order they were set: starting, refreshing or stopping one is O(1)
(a dict insert or delete), and one timer, armed for the oldest deadline, sweeps only what has
expired. Ten thousand idle connections cost no Python call per tick, just their dict entries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from portside.engine.deadlines import DeadlineQueue
from portside.engine.states import CloseReason, State

if TYPE_CHECKING:
    from portside.engine.connection import Connection
    from portside.engine.reactor import Reactor, TimerHandle


class TimeoutTracker:
    """Deadlines of one kind for one listener's connections; ``expire`` is called for each
    connection whose deadline passes, and ``expired`` counts them (unless ``expire`` returns
    False: it looked and found the connection alive, and may have started it again)."""

    def __init__(self, timeout: float, expire: Callable[[Connection], bool | None]) -> None:
        self.queue: DeadlineQueue[Connection] = DeadlineQueue(timeout)
        self.expired = 0
        self._expire = expire
        self._reactor: Reactor | None = None
        self._timer: TimerHandle | None = None

    def attach(self, reactor: Reactor) -> None:
        self._reactor = reactor

    def start(self, conn: Connection) -> None:
        """Start, or restart, ``conn``'s countdown."""
        reactor = self._reactor
        assert reactor is not None
        self.queue.add(conn, reactor.time())
        if self._timer is None:
            self._arm()

    def stop(self, conn: Connection) -> None:
        self.queue.discard(conn)

    def _arm(self) -> None:
        due = self.queue.next_due()
        reactor = self._reactor
        if due is not None and reactor is not None:
            self._timer = reactor.call_later(due - reactor.time(), self._sweep)

    def _sweep(self) -> None:
        # ``_timer`` still names the timer now running until the end: a start() from an
        # ``expire`` callback then leaves the arming to this sweep instead of adding a timer.
        reactor = self._reactor
        assert reactor is not None
        for conn in self.queue.pop_expired(reactor.time()):
            if self._expire(conn) is not False:
                self.expired += 1
        self._timer = None
        self._arm()


def closing_tracker(timeout: float, reason: CloseReason, abort: bool,
                    tracker_class: type[TimeoutTracker] = TimeoutTracker,
                    announce: Callable[[Connection], None] | None = None,
                    ) -> TimeoutTracker | None:
    """The idle, read and write timeouts: a tracker that closes each connection whose deadline
    passes for ``reason`` (resets it, when ``abort``: a peer that is not reading would keep a
    graceful close waiting forever); None when ``timeout`` is 0 (off). ``announce`` is told
    first (a log line, say)."""
    if not timeout:
        return None

    def expire(conn: Connection) -> bool:
        if conn._state >= State.CLOSING and not abort:
            return False  # closing already (say, flushing): not counted a second time
        if announce is not None:
            announce(conn)
        if abort:
            conn.abort_for(reason)
        else:
            conn.close_for(reason)
        return True

    return tracker_class(timeout, expire)
