"""Portside's own event loop: level-triggered ``select.epoll`` with a timer heap.

Theory of operation: each registered descriptor maps to an ``IOTarget``. Level-triggered mode is
used on purpose: a target reads once per wake-up and lets the kernel remind it of what is left, so
one busy connection cannot starve the others and no target needs a drain-until-EAGAIN loop. A
descriptor that wants no events at all is taken out of the epoll set (but stays known), because
EPOLLHUP and EPOLLERR are reported whatever the interest mask says and would otherwise wake a
paused connection in a busy loop. Timers live in a heap with lazy deletion: a cancelled timer is
only flagged, and dropped when it reaches the top. Other threads wake the loop through an eventfd.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import select
import threading
from collections import deque
from collections.abc import Callable
from time import monotonic as _monotonic

from portside.engine.reactor import IOTarget

_READ = select.EPOLLIN
_WRITE = select.EPOLLOUT
_TROUBLE = select.EPOLLHUP | select.EPOLLERR


logger = logging.getLogger("portside.engine")


def _guarded(callback: Callable[[], object]) -> None:
    try:
        callback()
    except Exception:
        logger.exception("internal error in scheduled callback %r", callback)


def _run_timer(timer: _Timer) -> None:
    # A function, not inline in the loop, so no local outlives the call and keeps the timer's
    # callback (say, a connection's method) referenced.
    if not timer.cancelled:
        _guarded(timer.callback)


class _Timer:
    """One scheduled callback; ordered by due time, then by creation for stable ties."""

    __slots__ = ("callback", "cancelled", "seq", "when")

    def __init__(self, when: float, seq: int, callback: Callable[[], object]) -> None:
        self.when = when
        self.seq = seq
        self.callback = callback
        self.cancelled = False

    def __lt__(self, other: _Timer) -> bool:
        return (self.when, self.seq) < (other.when, other.seq)

    def cancel(self) -> None:
        self.cancelled = True
        self.callback = _nothing  # drop the reference now: the heap keeps the timer until it is due


def _nothing() -> None:
    pass


class _Waker:
    """Reads the eventfd so that a cross-thread wake-up does not stay readable forever."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def handle_read(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.fd)

    def handle_write(self) -> None:  # never registered for writing
        pass


class EpollReactor:
    """A single-threaded readiness loop over ``select.epoll``."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._targets: dict[int, IOTarget] = {}
        self._masks: dict[int, int] = {}  # fd -> its mask when not just _READ (0: not in epoll)
        self._timers: list[_Timer] = []
        self._timer_seq = 0
        self._ready: deque[Callable[[], object]] = deque()
        self._stopping = False
        self._thread_id: int | None = None
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # Held while the wake-up descriptor is written or closed: another thread's wake-up
        # must never reach a closed descriptor, whose number the kernel may have given to
        # another file since. Reentrant: a signal handler runs on the thread that may hold it.
        self._wake_lock = threading.RLock()
        self.register(self._wake_fd, _Waker(self._wake_fd), readable=True, writable=False)

    @staticmethod
    def time() -> float:
        return _monotonic()

    def register(self, fd: int, target: IOTarget, readable: bool, writable: bool) -> None:
        self._targets[fd] = target
        mask = (_READ if readable else 0) | (_WRITE if writable else 0)
        if mask:
            self._epoll.register(fd, mask)
        self._store_mask(fd, mask)

    def modify(self, fd: int, readable: bool, writable: bool) -> None:
        if fd not in self._targets:  # never a closed descriptor, whose number may be reused
            raise KeyError(fd)
        mask = (_READ if readable else 0) | (_WRITE if writable else 0)
        current = self._masks.get(fd, _READ)
        if current == mask:
            return
        if not mask:
            self._epoll.unregister(fd)
        elif not current:
            self._epoll.register(fd, mask)
        else:
            self._epoll.modify(fd, mask)
        self._store_mask(fd, mask)

    def _store_mask(self, fd: int, mask: int) -> None:
        # Only masks other than "readable" are stored: that is what nearly every descriptor
        # is watched for, and a second table entry per idle connection is memory for nothing.
        if mask == _READ:
            self._masks.pop(fd, None)
        else:
            self._masks[fd] = mask

    def unregister(self, fd: int, closing: bool = False) -> None:
        if self._targets.pop(fd, None) is None:
            return  # not registered (or already unregistered)
        # Closing the last descriptor of a socket removes it from every epoll set: one
        # epoll_ctl fewer per connection (accepted sockets are never duplicated here).
        if self._masks.pop(fd, _READ) and not closing:
            self._epoll.unregister(fd)

    def targets(self) -> list[IOTarget]:
        return list(self._targets.values())

    def call_soon(self, callback: Callable[[], object]) -> None:
        self._ready.append(callback)

    def call_soon_threadsafe(self, callback: Callable[[], object]) -> None:
        self._ready.append(callback)  # deque.append is atomic under the GIL
        # Wake the loop even from its own thread: a signal handler runs there, between bytecodes,
        # and the epoll_wait it interrupted is retried with the old timeout (PEP 475). After
        # close() there is no loop to wake (a server stopping while another thread asks it
        # to): nothing is written.
        with self._wake_lock:
            if self._wake_fd >= 0:
                os.eventfd_write(self._wake_fd, 1)

    def call_later(self, delay: float, callback: Callable[[], object]) -> _Timer:
        self._timer_seq += 1
        timer = _Timer(_monotonic() + max(0.0, delay), self._timer_seq, callback)
        heapq.heappush(self._timers, timer)
        return timer

    def in_loop_thread(self) -> bool:
        return self._thread_id == threading.get_ident()

    def stop(self) -> None:
        self._stopping = True

    def run(self) -> None:
        """Dispatch events, timers and callbacks until ``stop()`` is called."""
        self._thread_id = threading.get_ident()
        self._stopping = False
        poll = self._epoll.poll
        targets = self._targets
        masks = self._masks
        ready = self._ready
        timers = self._timers
        # Locals, not globals: these are read for every event.
        readable, writable, trouble = _READ, _WRITE, _TROUBLE
        try:
            while not self._stopping:
                if ready:
                    timeout = 0.0
                elif timers:
                    timeout = max(0.0, timers[0].when - _monotonic())
                else:
                    timeout = -1.0
                for fd, events in poll(timeout):
                    target = targets.get(fd)
                    if target is None:
                        continue
                    try:
                        if events & readable:
                            target.handle_read()
                            if events & writable and targets.get(fd) is target:
                                target.handle_write()
                        elif events & trouble and masks.get(fd, readable) & readable:
                            target.handle_read()  # a read reports the error or the EOF
                        elif events & (writable | trouble):
                            target.handle_write()
                    except Exception:  # a bug in portside itself: keep serving everyone else
                        logger.exception("internal error handling fd %d", fd)
                # Drop the last target: a reference left in this frame would keep a closed
                # connection from being recycled (the pool only takes back unshared objects).
                target = None
                if timers:
                    now = _monotonic()
                    while timers and timers[0].when <= now:
                        _run_timer(heapq.heappop(timers))
                for _ in range(len(ready)):
                    _guarded(ready.popleft())
        finally:
            self._thread_id = None

    def close(self) -> None:
        """Release the epoll and wake-up descriptors; the loop must not be running. Closing
        twice, or a ``call_soon_threadsafe`` afterwards, does nothing."""
        self._epoll.close()
        with self._wake_lock:
            fd, self._wake_fd = self._wake_fd, -1
            if fd >= 0:
                os.close(fd)

