"""Pools of reusable IO buffers and connection objects (the seed's allocators).

A read borrows a buffer only for the length of one handler callback, so an idle connection holds
none and a server needs about one buffer per loop, however many connections it serves. Free
buffers are kept up to ``max_free``; beyond that they are dropped, which bounds the pool's memory.

What a lent buffer shows. A handler is lent a view of this read's bytes; ``view.obj`` is the
buffer itself, which Python 3.11 code cannot make export less than the whole of (there is no
``__buffer__`` before 3.12). So each buffer remembers how far reads have written into it
(``dirty``), and a read clears what an earlier, longer one left after its own bytes: the whole
buffer then holds this read's bytes and zeros, never another connection's. A buffer that
something still references after the callback (a view, a slice, ``view.obj`` itself) is never
lent again.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot of one pool: what is free, what is lent, and how often a request was met."""

    item_size: int
    free: int
    in_use: int
    max_free: int
    hits: int
    misses: int
    discarded: int


class PoolBuffer(bytearray):
    """A pool's read buffer: a ``bytearray`` that remembers how many of its bytes reads have
    written (``dirty``); past that it is all zeros."""

    __slots__ = ("dirty",)

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.dirty = 0


class BufferPool:
    """Fixed-size ``PoolBuffer``s (bytearrays), lent for one read each.

    The connection's read path takes from ``free`` directly (it runs once per read of every
    connection), calls ``allocate`` only when the list is empty, and inlines ``release``.
    The free list cannot outgrow the number of buffers lent at once (one per nested read), so
    only ``release`` checks ``max_free``. Hits are derived, not counted per read: every
    buffer taken is given back or still in use, so hits = given back + in use - allocated.
    """

    def __init__(self, buffer_size: int, max_free: int, preallocate: int = 3) -> None:
        # Three, not one: the read path pops a buffer and appends it back on every read, and
        # CPython resizes (reallocs) a list whose size falls below half its allocation; three
        # free buffers in an allocation of four never cross that line.
        self.buffer_size = buffer_size
        self.max_free = max_free
        self.free: list[PoolBuffer] = [
            PoolBuffer(buffer_size) for _ in range(min(preallocate, max_free))
        ]
        self._created = len(self.free)
        self._misses = 0
        self.returned = 0  # counted by the read path too, which inlines release
        self._discarded = 0

    def allocate(self) -> PoolBuffer:
        """A new buffer, when ``free`` is empty (a miss)."""
        self._misses += 1
        self._created += 1
        return PoolBuffer(self.buffer_size)

    def acquire(self) -> PoolBuffer:
        """A whole buffer, from the free list when one is there."""
        return self.free.pop() if self.free else self.allocate()

    def release(self, buffer: PoolBuffer) -> None:
        """Return a buffer; its contents may be overwritten by the next read.

        A buffer something still has a view of (a handler kept a slice of what it was lent)
        is dropped instead, so that view never shows another connection's bytes. (The read
        path, which inlines this, also drops a buffer a handler kept itself: ``view.obj``.)
        """
        self.returned += 1
        try:
            buffer.append(0)  # resizing fails while any memoryview of the buffer is alive
        except BufferError:
            self.discard()
            return
        del buffer[-1]
        if len(self.free) < self.max_free:
            self.free.append(buffer)
        else:
            self.discard()

    def discard(self) -> None:
        """Forget a lent buffer that cannot be reused."""
        self._discarded += 1
        self._created -= 1

    def statistics(self) -> PoolStatistics:
        in_use = self._created - len(self.free)
        return PoolStatistics(
            self.buffer_size, len(self.free), in_use, self.max_free,
            self.returned + in_use - self._misses, self._misses, self._discarded,
        )


def _refs_seen_by_callee(item: object) -> int:
    return sys.getrefcount(item)


def _unshared_refcount() -> int:
    """What ``sys.getrefcount`` says, inside a callee, of an object only its caller holds.

    Measured rather than written down, since it differs between Python versions.
    """
    probe = object()
    return _refs_seen_by_callee(probe)


_UNSHARED_REFCOUNT = _unshared_refcount()


def _local_refcount() -> int:
    """What ``sys.getrefcount`` says of an object held in one local variable only, asked in
    the function holding it (the read path's check, inlined)."""
    probe = object()
    return sys.getrefcount(probe)


#: See ``_local_refcount``: a pool buffer's count on the read path when nobody kept it.
LOCAL_REFCOUNT = _local_refcount()


class ObjectPool(Generic[T]):
    """Reuses objects that nobody outside portside still references.

    Recycling an object a user still holds would let a stale reference act on a new connection,
    so an object is only taken back when ``sys.getrefcount`` shows no reference but the caller's.
    """

    def __init__(self, factory: Callable[[], T], max_free: int, preallocate: int) -> None:
        self._factory = factory
        self.max_free = max_free
        self._free: list[T] = [factory() for _ in range(min(preallocate, max_free))]
        self._in_use = 0
        self._hits = 0
        self._misses = 0
        self._discarded = 0

    def acquire(self) -> T:
        self._in_use += 1
        if self._free:
            self._hits += 1
            return self._free.pop()
        self._misses += 1
        return self._factory()

    def recycle(self, item: T) -> bool:
        """Take ``item`` back if it is unshared and there is room; True when it was kept.

        The caller must hold ``item`` in exactly one local variable, as the calibration did.
        """
        self._in_use -= 1
        if len(self._free) < self.max_free and sys.getrefcount(item) <= _UNSHARED_REFCOUNT:
            self._free.append(item)
            return True
        self._discarded += 1
        return False

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(
            0, len(self._free), self._in_use, self.max_free,
            self._hits, self._misses, self._discarded,
        )
