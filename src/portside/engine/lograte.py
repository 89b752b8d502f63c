"""Log lines an operator can live with: per-kind rate limiting with periodic summaries.

Theory of operation. Each kind of event (say "first-data timeouts on 127.0.0.1:5001") has a
window of ``interval`` seconds that opens with its first event. The first ``burst`` events of a
window are logged one by one; later ones are only counted, and when the window ends one summary
line says how many were not logged ("closed 1,950 more connections on ... (no data within 5 s)
in the last 10 s"). The summary is written by a timer the owner's loop runs (``schedule``), or
by ``flush()`` when the owner stops, so a flood that ends still gets its summary. Statistics
are counted elsewhere, for every event: this module only decides what reaches the log.

No sockets and no loop: the clock and the timer are passed in, so tests drive it by hand.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

#: A window's length and how many lines of one kind it logs before it only counts.
SUMMARY_INTERVAL = 10.0
BURST = 5

Clock = Callable[[], float]
#: ``schedule(delay, callback)``: run ``callback`` in ``delay`` seconds (the loop's call_later).
Schedule = Callable[[float, Callable[[], None]], object]


class _Window:
    __slots__ = ("level", "logged", "opened", "summary", "suppressed")

    def __init__(self, opened: float, level: int, summary: str) -> None:
        self.opened = opened
        self.logged = 0
        self.suppressed = 0
        self.level = level
        self.summary = summary


class LogLimiter:
    """Writes at most ``burst`` lines of each kind per ``interval``, then one summary."""

    def __init__(self, logger: logging.Logger, clock: Clock = time.monotonic,
                 schedule: Schedule | None = None, interval: float | None = None,
                 burst: int | None = None) -> None:
        self.logger = logger
        self.clock = clock
        self.schedule = schedule
        # Read at construction, so a test can change the module's defaults for one server.
        self.interval = SUMMARY_INTERVAL if interval is None else interval
        self.burst = BURST if burst is None else burst
        self._windows: dict[str, _Window] = {}
        self._timer_armed = False

    def log(self, kind: str, level: int, summary: str, message: str, *args: Any) -> None:
        """Log ``message % args`` unless ``kind`` has used up its window; then count it.

        ``summary`` is the summary line's text, with ``{count}`` where the number of lines not
        logged goes: "closed {count} more silent connections on 127.0.0.1:5001".
        """
        if not self.logger.isEnabledFor(level):
            return
        now = self.clock()
        window = self._windows.get(kind)
        if window is not None and now - window.opened >= self.interval:
            self._close(kind, window, now)
            window = None
        if window is None:
            window = self._windows[kind] = _Window(now, level, summary)
        if window.logged < self.burst:
            window.logged += 1
            self.logger.log(level, message, *args, stacklevel=2)
            return
        window.suppressed += 1
        window.summary = summary
        if not self._timer_armed and self.schedule is not None:
            self._timer_armed = True
            self.schedule(max(0.0, window.opened + self.interval - now), self._on_timer)

    def flush(self) -> None:
        """Write every pending summary now (the owner is stopping)."""
        now = self.clock()
        for kind, window in list(self._windows.items()):
            self._close(kind, window, now)

    def _on_timer(self) -> None:
        """Close the windows that have ended; come back for those still open and suppressing."""
        self._timer_armed = False
        now = self.clock()
        next_end: float | None = None
        for kind, window in list(self._windows.items()):
            end = window.opened + self.interval
            if end <= now:
                self._close(kind, window, now)
            elif window.suppressed and (next_end is None or end < next_end):
                next_end = end
        if next_end is not None and self.schedule is not None:
            self._timer_armed = True
            self.schedule(max(0.0, next_end - now), self._on_timer)

    def _close(self, kind: str, window: _Window, now: float) -> None:
        del self._windows[kind]
        if window.suppressed:
            # The window's length, or less when flush() ends it early.
            span = min(self.interval, max(0.0, now - window.opened))
            self.logger.log(window.level, "%s in the last %.3g s (not logged one by one)",
                            window.summary.format(count=f"{window.suppressed:,}"), span)
