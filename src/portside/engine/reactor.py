"""The seam between portside's connection logic and an event loop.

Listeners and connections only ever talk to a ``Reactor``: register a file descriptor with a
target whose ``handle_read``/``handle_write`` are called on readiness, and schedule callbacks.
Two implementations exist: ``EpollReactor`` (portside's own loop) and ``AsyncioReactor`` (a
running asyncio or uvloop loop). Keeping the seam this narrow is what lets one behaviour test
suite run unchanged against every engine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class IOTarget(Protocol):
    """Something that wants to hear when its descriptor is readable or writable."""

    def handle_read(self) -> None: ...

    def handle_write(self) -> None: ...


class TimerHandle(Protocol):
    """A scheduled callback that may be cancelled before it runs."""

    def cancel(self) -> None: ...


class Reactor(Protocol):
    """Readiness notification and scheduling, as the engine needs them."""

    def time(self) -> float:
        """Monotonic seconds; the clock every deadline is measured on."""
        ...

    def register(self, fd: int, target: IOTarget, readable: bool, writable: bool) -> None:
        """Start watching ``fd``; ``target`` is called while the chosen events hold."""
        ...

    def modify(self, fd: int, readable: bool, writable: bool) -> None:
        """Change which events ``fd`` is watched for (both False keeps it registered, idle)."""
        ...

    def unregister(self, fd: int, closing: bool = False) -> None:
        """Stop watching ``fd``; must be called before the descriptor is closed.

        ``closing`` says the caller closes ``fd`` next and holds its only copy, so a loop
        whose kernel drops closed descriptors itself (epoll) may skip the system call.
        """
        ...

    def targets(self) -> list[IOTarget]:
        """Everything registered now."""
        ...

    def call_soon(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` on the loop's thread at the next iteration."""
        ...

    def call_soon_threadsafe(self, callback: Callable[[], object]) -> None:
        """Like ``call_soon`` but callable from any thread; wakes the loop."""
        ...

    def call_later(self, delay: float, callback: Callable[[], object]) -> TimerHandle:
        """Run ``callback`` after ``delay`` seconds unless the handle is cancelled."""
        ...

    def in_loop_thread(self) -> bool:
        """True when called from the thread that runs this loop."""
        ...

    def stop(self) -> None:
        """Make the loop's ``run`` return after the current iteration (loop thread only)."""
        ...
