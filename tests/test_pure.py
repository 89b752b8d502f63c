"""Pure pieces, no sockets: the deadline queue, the pools, settings checks and the public API."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portside import ConfigError, ListenerConfig, ServerConfig
from portside.engine.buffers import BufferPool, ObjectPool
from portside.engine.deadlines import DeadlineQueue


def test_deadline_queue_expires_in_arrival_order() -> None:
    queue: DeadlineQueue[str] = DeadlineQueue(timeout=5.0)
    queue.add("a", now=0.0)
    queue.add("b", now=1.0)
    queue.add("c", now=2.0)
    assert queue.next_due() == 5.0
    assert queue.pop_expired(now=4.9) == []
    assert queue.pop_expired(now=6.0) == ["a", "b"]
    assert queue.next_due() == 7.0 and len(queue) == 1


def test_deadline_queue_discard_and_refresh() -> None:
    queue: DeadlineQueue[str] = DeadlineQueue(timeout=1.0)
    queue.add("a", now=0.0)
    queue.add("b", now=0.5)
    queue.add("a", now=0.9)  # refreshed: now behind b
    queue.discard("b")
    assert "b" not in queue
    assert queue.pop_expired(now=1.6) == []
    assert queue.pop_expired(now=1.9) == ["a"]
    assert queue.next_due() is None


def test_pressure_sweep_takes_only_the_old() -> None:
    queue: DeadlineQueue[int] = DeadlineQueue(timeout=30.0)
    for i in range(10):
        queue.add(i, now=float(i))
    assert queue.pop_older_than(age=5.0, now=10.0) == [0, 1, 2, 3, 4, 5]
    assert len(queue) == 4


@given(st.lists(st.tuples(st.integers(0, 20), st.floats(0, 100)), max_size=50), st.floats(0, 200))
def test_expiry_matches_a_naive_model(ops: list[tuple[int, float]], now: float) -> None:
    queue: DeadlineQueue[int] = DeadlineQueue(timeout=10.0)
    model: dict[int, float] = {}
    clock = 0.0
    for item, step in ops:
        clock += step / 10
        queue.add(item, clock)
        model[item] = clock + 10.0
    expired = queue.pop_expired(clock + now)
    assert sorted(expired) == sorted(k for k, due in model.items() if due <= clock + now)


def test_buffer_pool_reuses_and_bounds() -> None:
    pool = BufferPool(buffer_size=1024, max_free=2, preallocate=1)
    first = pool.acquire()
    pool.release(first)
    assert pool.acquire() is first
    views = [first, pool.acquire(), pool.acquire(), pool.acquire()]
    for view in views:
        pool.release(view)
    stats = pool.statistics()
    assert (stats.free, stats.in_use, stats.discarded) == (2, 0, 2)
    assert stats.hits == 2 and stats.misses == 3


class Thing:
    pass


def test_object_pool_never_recycles_a_shared_object() -> None:
    pool: ObjectPool[Thing] = ObjectPool(Thing, max_free=4, preallocate=0)
    kept = pool.acquire()
    alias = kept
    assert not pool.recycle(kept)  # someone else still holds it
    del alias
    item = pool.acquire()
    assert pool.recycle(item)
    assert pool.acquire() is not kept


@pytest.mark.parametrize("settings", [
    {"port": 70000}, {"first_data_timeout": -1}, {"max_connections": 0},
    {"write_high_water": 10, "write_low_water": 20}, {"policy": "sometimes"},
    {"first_data_timeout": float("nan")},
])
def test_bad_listener_settings_are_config_errors(settings: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        ListenerConfig(**settings)  # type: ignore[arg-type]


def test_bad_server_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown engine"):
        ServerConfig(engine="nope")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="drain_timeout"):
        ServerConfig(drain_timeout=-1)
