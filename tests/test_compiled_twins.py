"""The compiled engine's twins (``_compiled.pyx``) against their pure references, on the same
inputs: the deadline queue and timeout tracker, the buffer and object pools, and the TTFB
histogram's bucketing. Differential tests: hypothesis drives both with one sequence of
operations and every answer, counter and armed timer must agree. The behaviour suite tests
the pure ones on sockets; these make the compiled ones answer for themselves."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import HAVE_COMPILED, require
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from portside import ListenerConfig
from portside.engine import buffers, deadlines, timeouts
from portside.engine.listener import Listener
from portside.statistics import TTFB_BUCKETS

if HAVE_COMPILED:
    from portside.engine import _compiled
    from portside.engine.compiled import CompiledListener


@pytest.fixture(autouse=True)
def compiled_built() -> None:
    require(HAVE_COMPILED, "the compiled engine (pip install -e . builds it)")


KEYS = [f"conn{i}" for i in range(6)]
keys = st.sampled_from(KEYS)
steps = st.sampled_from([0.0, 0.25, 0.5, 0.999, 1.0, 1.001, 2.0, 3.5])
timeouts_ = st.sampled_from([0.5, 1.0, 2.5])


# -- DeadlineQueue ---------------------------------------------------------------------------------


class DeadlineQueues(RuleBasedStateMachine):
    """One deadline queue of each kind, the same operations, the same answers."""

    @initialize(timeout=timeouts_)
    def start(self, timeout: float) -> None:
        self.now = 100.0
        self.pure: deadlines.DeadlineQueue[str] = deadlines.DeadlineQueue(timeout)
        self.twin = _compiled.DeadlineQueue(timeout)

    @rule(step=steps)
    def advance(self, step: float) -> None:
        self.now += step

    @rule(key=keys)
    def add(self, key: str) -> None:
        self.pure.add(key, self.now)
        self.twin.add(key, self.now)

    @rule(key=keys)
    def discard(self, key: str) -> None:
        self.pure.discard(key)
        self.twin.discard(key)

    @rule()
    def pop_expired(self) -> None:
        assert self.twin.pop_expired(self.now) == self.pure.pop_expired(self.now)

    @rule(age=st.sampled_from([0.0, 0.3, 0.5, 1.0, 2.0]))
    def pop_older_than(self, age: float) -> None:
        assert self.twin.pop_older_than(age, self.now) == self.pure.pop_older_than(age, self.now)

    @invariant()
    def same_state(self) -> None:
        if not hasattr(self, "pure"):
            return
        assert len(self.twin) == len(self.pure)
        assert self.twin.next_due() == self.pure.next_due()
        assert [key in self.twin for key in KEYS] == [key in self.pure for key in KEYS]


TestDeadlineQueues = DeadlineQueues.TestCase
TestDeadlineQueues.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# -- TimeoutTracker --------------------------------------------------------------------------------


class FakeReactor:
    """A clock and its timers, driven by the test (``call_later`` is all a tracker uses)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.timers: list[tuple[float, int, Callable[[], object]]] = []
        self._order = 0

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], object]) -> object:
        self._order += 1
        self.timers.append((self.now + delay, self._order, callback))
        return self

    def armed(self) -> list[float]:
        return sorted(due for due, _, _ in self.timers)

    def fire_due(self) -> None:
        """Run the timers due by now, oldest first (those they arm included)."""
        while True:
            due = [timer for timer in self.timers if timer[0] <= self.now]
            if not due:
                return
            timer = min(due, key=lambda item: (item[0], item[1]))
            self.timers.remove(timer)
            timer[2]()


class Trackers(RuleBasedStateMachine):
    """One tracker of each kind, on twin fake reactors; ``expire`` may look, find the
    connection alive, restart it and return False (the read-silence tracker does)."""

    @initialize(timeout=timeouts_, alive=st.frozensets(keys))
    def start(self, timeout: float, alive: frozenset[str]) -> None:
        self.alive = alive  # these are looked at, found alive and restarted, not expired
        self.sides: list[tuple[Any, FakeReactor, list[str]]] = []
        for kind in (timeouts.TimeoutTracker, _compiled.TimeoutTracker):
            reactor = FakeReactor()
            expired: list[str] = []
            holder: list[Any] = []  # this side's tracker, for its own expire callback

            def expire(conn: str, expired: list[str] = expired,
                       holder: list[Any] = holder) -> bool | None:
                expired.append(conn)
                if conn in self.alive:
                    holder[0].start(conn)
                    return False
                return None

            tracker: Any = kind(timeout, expire)  # type: ignore[arg-type]
            holder.append(tracker)
            tracker.attach(reactor)
            self.sides.append((tracker, reactor, expired))

    @rule(key=keys)
    def start_conn(self, key: str) -> None:
        for tracker, _, _ in self.sides:
            tracker.start(key)

    @rule(key=keys)
    def stop(self, key: str) -> None:
        for tracker, _, _ in self.sides:
            tracker.stop(key)

    @rule(step=steps)
    def advance(self, step: float) -> None:
        for _, reactor, _ in self.sides:
            reactor.now += step
            reactor.fire_due()

    @invariant()
    def same_state(self) -> None:
        if not hasattr(self, "sides"):
            return
        (pure, pure_reactor, pure_expired), (twin, twin_reactor, twin_expired) = self.sides
        assert twin_expired == pure_expired
        assert twin.expired == pure.expired
        assert twin_reactor.armed() == pure_reactor.armed()
        assert len(twin.queue) == len(pure.queue)
        assert twin.queue.next_due() == pure.queue.next_due()


TestTrackers = Trackers.TestCase
TestTrackers.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_compiled_tracker_is_what_the_compiled_listener_uses() -> None:
    tracker_class: object = CompiledListener.tracker_class  # typed as the pure one's (stub)
    assert tracker_class is _compiled.TimeoutTracker


# -- the buffer pool -------------------------------------------------------------------------------


class BufferPools(RuleBasedStateMachine):
    """The pure pool of bytearrays and the compiled pool of IOBuffers: the same loans, the
    same statistics; a buffer whose view outlived its loan is dropped by both."""

    @initialize(max_free=st.integers(1, 4), preallocate=st.integers(0, 3))
    def start(self, max_free: int, preallocate: int) -> None:
        self.pools: list[Any] = [buffers.BufferPool(64, max_free, preallocate),
                                 _compiled.BufferPool(64, max_free, preallocate)]
        self.lent: list[list[Any]] = [[], []]
        self.views: list[memoryview] = []

    @rule()
    def acquire(self) -> None:
        for pool, lent in zip(self.pools, self.lent, strict=True):
            lent.append(pool.acquire())

    @precondition(lambda self: bool(self.lent[0]))
    @rule(index=st.integers(0, 7), keep_view=st.booleans())
    def release(self, index: int, keep_view: bool) -> None:
        index %= len(self.lent[0])
        for pool, lent in zip(self.pools, self.lent, strict=True):
            buffer = lent.pop(index)
            if keep_view:  # a handler kept a slice of what it was lent
                self.views.append(memoryview(buffer)[:4])
            pool.release(buffer)

    @rule()
    def views_die(self) -> None:
        for view in self.views:
            view.release()
        self.views.clear()

    @invariant()
    def same_statistics(self) -> None:
        if hasattr(self, "pools"):
            assert self.pools[1].statistics() == self.pools[0].statistics()


TestBufferPools = BufferPools.TestCase
TestBufferPools.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


# -- the object pool -------------------------------------------------------------------------------


class Thing:
    pass


class ObjectPools(RuleBasedStateMachine):
    """Objects taken back only when unshared and while there is room, on both pools."""

    @initialize(max_free=st.integers(0, 4), preallocate=st.integers(0, 3))
    def start(self, max_free: int, preallocate: int) -> None:
        self.pools: list[Any] = [buffers.ObjectPool(Thing, max_free, preallocate),
                                 _compiled.ObjectPool(Thing, max_free, preallocate)]
        self.lent: list[list[Thing]] = [[], []]
        self.kept: list[Thing] = []  # references a user still holds

    @rule()
    def acquire(self) -> None:
        for pool, lent in zip(self.pools, self.lent, strict=True):
            lent.append(pool.acquire())

    @precondition(lambda self: bool(self.lent[0]))
    @rule(index=st.integers(0, 7), shared=st.booleans())
    def recycle(self, index: int, shared: bool) -> None:
        index %= len(self.lent[0])
        pure, twin = self.pools
        item = self.lent[0].pop(index)  # the caller holds it in one local only
        if shared:
            self.kept.append(item)
        kept_by_pure = pure.recycle(item)
        del item
        if shared:
            item = self.lent[1].pop(index)
            self.kept.append(item)
            kept_by_twin = twin.recycle(item)
            del item
        else:  # one reference fewer: what the compiled core hands over (see the xfail below)
            kept_by_twin = twin.recycle(self.lent[1].pop(index))
        assert kept_by_twin == kept_by_pure

    @invariant()
    def same_statistics(self) -> None:
        if hasattr(self, "pools"):
            assert self.pools[1].statistics() == self.pools[0].statistics()


TestObjectPools = ObjectPools.TestCase
TestObjectPools.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


@pytest.mark.xfail(strict=True, reason="compiled ObjectPool.recycle subtracts one reference "
                   "too few for a Python caller: it refuses an object held in one local (safe, "
                   "but not its twin's contract); for the engine's owners to fix")
def test_compiled_recycle_counts_one_local_like_the_pure_one() -> None:
    answers = []
    pools: tuple[Any, ...] = (buffers.ObjectPool(Thing, 1, 0), _compiled.ObjectPool(Thing, 1, 0))
    for pool in pools:
        item = pool.acquire()  # held in one local only, as recycle's contract asks
        answers.append(pool.recycle(item))
        del item
    assert answers == [True, True]


# -- the time-to-first-byte histogram --------------------------------------------------------------


def _edges() -> Iterator[float]:
    for bound in TTFB_BUCKETS[:-1]:
        yield from (bound * (1 - 1e-9), bound, bound * (1 + 1e-9))


seconds = st.one_of(st.sampled_from([0.0, *_edges(), 1e9, float("inf")]),
                    st.floats(0, 10, allow_nan=False))


@given(st.lists(seconds, max_size=30))
def test_ttfb_bucketing_is_the_same(values: list[float]) -> None:
    """Each bound is the upper end of its bucket (Prometheus's ``le``): a value equal to a
    bound lands in that bucket on both engines, one just above it in the next."""
    pure = Listener(ListenerConfig(), socket.socket())
    twin = CompiledListener(ListenerConfig(), socket.socket())
    try:
        for value in values:
            pure.record_first_byte(value)
            twin.record_first_byte(value)
        assert list(twin.ttfb_buckets) == list(pure.ttfb_buckets)
        assert twin.ttfb_sum == pure.ttfb_sum
    finally:
        pure.sock.close()
        twin.sock.close()


def test_ttfb_bucket_edges_are_inclusive() -> None:
    """Not only equal to each other: right by the histogram's definition."""
    pure = Listener(ListenerConfig(), socket.socket())
    try:
        for index, bound in enumerate(TTFB_BUCKETS[:-1]):
            before = list(pure.ttfb_buckets)
            pure.record_first_byte(bound)
            after = list(pure.ttfb_buckets)
            assert [b - a for a, b in zip(before, after, strict=True)].index(1) == index
    finally:
        pure.sock.close()
