"""The log rate limiter: pure tests on a fake clock and timer, then a real flood of 2,000 silent
connections whose log stays a few lines long while the statistics count every one."""

from __future__ import annotations

import logging
import re
import resource
from collections.abc import Callable, Iterator

import pytest
from conftest import WAIT, Clients, ServeFactory
from test_limits import listener_stats, wait_until

from portside import AcceptPolicy, ListenerConfig
from portside.engine import lograte
from portside.engine.lograte import LogLimiter


class FakeLoop:
    """A clock and a call_later the test advances by hand."""

    def __init__(self) -> None:
        self.now = 100.0
        self.timers: list[tuple[float, Callable[[], None]]] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> object:
        self.timers.append((self.now + delay, callback))
        return object()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        due = [timer for timer in self.timers if timer[0] <= self.now]
        self.timers = [timer for timer in self.timers if timer[0] > self.now]
        for _, callback in sorted(due, key=lambda timer: timer[0]):
            callback()


@pytest.fixture
def limited(caplog: pytest.LogCaptureFixture) -> Iterator[tuple[LogLimiter, FakeLoop]]:
    caplog.set_level(logging.INFO, logger="test.lograte")
    loop = FakeLoop()
    yield LogLimiter(logging.getLogger("test.lograte"), loop.time, loop.call_later,
                     interval=10.0, burst=3), loop


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "test.lograte"]


def timeout(limiter: LogLimiter, n: int) -> None:
    limiter.log("timeout", logging.INFO, "closed {count} more silent connections",
                "closed client %d", n)


def test_burst_then_one_summary_when_the_window_ends(
        limited: tuple[LogLimiter, FakeLoop], caplog: pytest.LogCaptureFixture) -> None:
    limiter, loop = limited
    for n in range(2000):
        timeout(limiter, n)
        loop.advance(0.001)
    assert messages(caplog) == ["closed client 0", "closed client 1", "closed client 2"]
    assert len(loop.timers) == 1  # one timer for the window, not one per event
    loop.advance(10.0)
    assert messages(caplog)[3:] == [
        "closed 1,997 more silent connections in the last 10 s (not logged one by one)"]
    assert loop.timers == []  # nothing more to say: no timer left running


def test_kinds_are_limited_apart(limited: tuple[LogLimiter, FakeLoop],
                                 caplog: pytest.LogCaptureFixture) -> None:
    limiter, loop = limited
    for n in range(10):
        timeout(limiter, n)
        limiter.log("tls", logging.INFO, "{count} more TLS handshakes failed", "tls %d", n)
    assert len(messages(caplog)) == 6
    loop.advance(10.0)
    assert sorted(messages(caplog)[6:]) == [
        "7 more TLS handshakes failed in the last 10 s (not logged one by one)",
        "closed 7 more silent connections in the last 10 s (not logged one by one)"]


def test_a_new_window_logs_again(limited: tuple[LogLimiter, FakeLoop],
                                 caplog: pytest.LogCaptureFixture) -> None:
    limiter, loop = limited
    for n in range(3):
        timeout(limiter, n)
    loop.advance(10.0)  # the window ends with nothing suppressed: no summary
    assert len(messages(caplog)) == 3
    timeout(limiter, 3)
    assert messages(caplog)[-1] == "closed client 3"


def test_flush_writes_pending_summaries_at_once(
        limited: tuple[LogLimiter, FakeLoop], caplog: pytest.LogCaptureFixture) -> None:
    limiter, loop = limited
    for n in range(5):
        timeout(limiter, n)
    loop.now += 2.5
    limiter.flush()
    assert messages(caplog)[-1] == (
        "closed 2 more silent connections in the last 2.5 s (not logged one by one)")
    loop.advance(10.0)  # the timer finds nothing left to say
    assert len(messages(caplog)) == 4


def test_a_level_that_is_off_costs_no_window(
        limited: tuple[LogLimiter, FakeLoop], caplog: pytest.LogCaptureFixture) -> None:
    limiter, loop = limited
    limiter.log("debugging", logging.DEBUG, "{count}", "quiet")
    assert messages(caplog) == [] and loop.timers == []


# -- a real flood ---------------------------------------------------------------------------------


FLOOD = 2000


@pytest.fixture
def descriptors_for_a_flood() -> Iterator[None]:
    """The client and the server side of every flood connection live in this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * FLOOD + 512
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.fail(f"the flood test needs {wanted} descriptors; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_flood_of_silent_connections_leaves_a_short_log(
        serve: ServeFactory, clients: Clients, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch, descriptors_for_a_flood: None) -> None:
    caplog.set_level(logging.INFO, logger="portside")
    monkeypatch.setattr(lograte, "SUMMARY_INTERVAL", 1.0)  # read when the listener is made
    rs = serve(ListenerConfig(policy=AcceptPolicy.DATA_FIRST, defer_accept=0,
                              first_data_timeout=0.2, backlog=4096))
    for _ in range(FLOOD):  # bounded in count; each connect is bounded by WAIT
        clients.connect(rs.address())
    wait_until(lambda: listener_stats(rs).first_data_timeouts == FLOOD,
               f"{FLOOD} first-data timeouts", timeout=6 * WAIT)
    stats = listener_stats(rs)
    assert stats.closed_by_reason == {"first-data-timeout": FLOOD}
    # The summary comes from the loop's timer once the 1 s window ends, while serving goes on.
    wait_until(lambda: any("more silent connections" in record.getMessage()
                           for record in list(caplog.records)), "the summary line")
    clients.close_all()
    rs.stop()  # would flush any summary still pending
    lines = [record.getMessage() for record in caplog.records
             if "no data within" in record.getMessage()]
    one_by_one = [line for line in lines if "more silent connections" not in line]
    summarized = [int(match.group(1).replace(",", "")) for line in lines
                  if (match := re.search(r"closed ([\d,]+) more silent connections", line))]
    assert summarized, lines
    assert len(one_by_one) + sum(summarized) == FLOOD  # the log accounts for every one...
    assert len(lines) <= 60, lines[:10]  # ...in a few lines, not two thousand
    assert all("in the last" in line and "data-first" in line
               for line in lines if line not in one_by_one)
