"""The same readiness events as ``EpollReactor``, taken from a running asyncio (or uvloop) loop.

Only ``add_reader``/``add_writer`` and the loop's scheduling calls are used, so portside keeps its
own accept loop, buffers and write queue on every platform asyncio runs on.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from portside.engine.reactor import IOTarget, TimerHandle


class AsyncioReactor:
    """Adapts an asyncio event loop to portside's ``Reactor`` seam."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._interest: dict[int, tuple[IOTarget, bool, bool]] = {}
        self._thread_id = threading.get_ident()
        self.stopped = asyncio.Event()

    def time(self) -> float:
        return self.loop.time()

    def register(self, fd: int, target: IOTarget, readable: bool, writable: bool) -> None:
        self._interest[fd] = (target, False, False)
        self.modify(fd, readable, writable)

    def modify(self, fd: int, readable: bool, writable: bool) -> None:
        target, was_readable, was_writable = self._interest[fd]
        if readable != was_readable:
            if readable:
                self.loop.add_reader(fd, target.handle_read)
            else:
                self.loop.remove_reader(fd)
        if writable != was_writable:
            if writable:
                self.loop.add_writer(fd, target.handle_write)
            else:
                self.loop.remove_writer(fd)
        self._interest[fd] = (target, readable, writable)

    def unregister(self, fd: int, closing: bool = False) -> None:
        entry = self._interest.pop(fd, None)
        if entry is None:
            return
        if entry[1]:
            self.loop.remove_reader(fd)
        if entry[2]:
            self.loop.remove_writer(fd)

    def targets(self) -> list[IOTarget]:
        return [entry[0] for entry in self._interest.values()]

    def call_soon(self, callback: Callable[[], object]) -> None:
        self.loop.call_soon(callback)

    def call_soon_threadsafe(self, callback: Callable[[], object]) -> None:
        self.loop.call_soon_threadsafe(callback)

    def call_later(self, delay: float, callback: Callable[[], object]) -> TimerHandle:
        return self.loop.call_later(delay, callback)

    def in_loop_thread(self) -> bool:
        return self._thread_id == threading.get_ident()

    def stop(self) -> None:
        self.stopped.set()
