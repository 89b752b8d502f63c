"""The per-client admission policy without sockets: keys, the open-connection and rate limits,
and the table's bound, driven by a hand-held clock (property tests with hypothesis)."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portside.config import ListenerConfig
from portside.engine.admission import (
    Client,
    ClientAdmission,
    ClientKeys,
    ClientTable,
    Refusal,
    describe_key,
)
from portside.errors import ConfigError

# -- keys ---------------------------------------------------------------------------------------


def test_keys_group_by_prefix() -> None:
    keys = ClientKeys()  # /32 and /64
    assert keys.of_text("192.0.2.1") != keys.of_text("192.0.2.2")
    assert keys.of_text("2001:db8:1:2::1") == keys.of_text("2001:db8:1:2:ffff::9")
    assert keys.of_text("2001:db8:1:2::1") != keys.of_text("2001:db8:1:3::1")
    # A dual-stack socket shows IPv4 clients as ::ffff:a.b.c.d: the same client as IPv4.
    assert keys.of_text("::ffff:192.0.2.1") == keys.of_text("192.0.2.1")
    assert keys.of_text("fe80::1%lo") == keys.of_text("fe80::1")
    assert keys.of_text("not an address") is None and keys.of_packed(b"abc") is None
    # IPv4 /32 and IPv6 /32 keep four bytes each, and still never meet.
    assert ClientKeys(32, 32).of_text("32.1.13.184") != ClientKeys(32, 32).of_text("2001:db8::")
    grouped = ClientKeys(ipv4_prefix=24, ipv6_prefix=56)
    assert grouped.of_text("192.0.2.1") == grouped.of_text("192.0.2.254")
    assert grouped.of_text("192.0.2.1") != grouped.of_text("192.0.3.1")
    assert describe_key(keys.of_text("2001:db8:1:2::7") or b"") == "2001:db8:1:2::/64"
    assert describe_key(keys.of_text("192.0.2.7") or b"") == "192.0.2.7"


addresses = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))


@given(addresses, addresses, st.integers(0, 32), st.integers(0, 128))
def test_same_key_exactly_when_same_network(a: ipaddress.IPv4Address | ipaddress.IPv6Address,
                                            b: ipaddress.IPv4Address | ipaddress.IPv6Address,
                                            v4: int, v6: int) -> None:
    def network(address: ipaddress.IPv4Address | ipaddress.IPv6Address
                ) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        prefix = v4 if address.version == 4 else v6
        return ipaddress.ip_network(f"{address}/{prefix}", strict=False)

    keys = ClientKeys(v4, v6)
    same = keys.of_text(str(a)) == keys.of_text(str(b))
    assert same == (network(a) == network(b))
    # The packed form (what the compiled accept loop passes) gives the same key.
    assert keys.of_packed(a.packed) == keys.of_text(str(a))
    family = socket.AF_INET if a.version == 4 else socket.AF_INET6
    assert keys.of_packed(socket.inet_pton(family, str(a))) == keys.of_text(str(a))


# -- the limits -----------------------------------------------------------------------------------


def test_open_connections_per_client() -> None:
    table = ClientTable(max_open=2)
    a1, a2 = table.admit(b"a", 0.0), table.admit(b"a", 0.0)
    assert isinstance(a1, Client) and isinstance(a2, Client)
    assert table.admit(b"a", 0.0) is Refusal.TOO_MANY
    assert isinstance(table.admit(b"b", 0.0), Client)  # another client is not affected
    table.release(a1, 1.0)
    assert isinstance(table.admit(b"a", 1.0), Client)
    assert table.refused == 1


def test_rate_is_a_two_bucket_sliding_window() -> None:
    """HAProxy's freq_ctr: the previous period counts for the part of it still inside the
    last period. Three per second: full at 0.0; at 1.5 half of the previous three count."""
    table = ClientTable(max_rate=3, period=1.0)
    for _ in range(3):
        admitted = table.admit(b"a", 0.0)
        assert isinstance(admitted, Client)
        table.release(admitted, 0.0)
    assert table.admit(b"a", 0.99) is Refusal.TOO_FAST
    # At 1.0 the previous bucket still weighs all of its 3: refused (not too early) ...
    assert table.admit(b"a", 1.0) is Refusal.TOO_FAST
    # ... and at 1 + 1/3 its weight is 2, so one more fits (not too late).
    assert table.admit(b"a", 1.3) is Refusal.TOO_FAST
    assert isinstance(table.admit(b"a", 1.34), Client)
    assert table.admit(b"a", 1.35) is Refusal.TOO_FAST
    assert isinstance(table.admit(b"b", 1.35), Client)  # per client
    # Two periods of silence forget everything.
    for _ in range(3):
        assert isinstance(table.admit(b"a", 3.4), Client)


def test_refused_connections_do_not_count() -> None:
    """A client that retries in a loop gets in at the limit's pace, not never."""
    table = ClientTable(max_rate=1, period=1.0)
    assert isinstance(table.admit(b"a", 0.0), Client)
    for step in range(1, 100):
        assert table.admit(b"a", step / 100) is Refusal.TOO_FAST
    assert isinstance(table.admit(b"a", 2.0), Client)


def test_idle_clients_go_once_their_window_has_passed() -> None:
    only_open = ClientTable(max_open=1)
    admitted = only_open.admit(b"a", 0.0)
    assert isinstance(admitted, Client) and len(only_open) == 1
    only_open.release(admitted, 0.0)
    assert len(only_open) == 0  # no rate to remember: gone at once
    rated = ClientTable(max_rate=5, period=1.0)
    admitted = rated.admit(b"a", 0.0)
    assert isinstance(admitted, Client)
    rated.release(admitted, 0.1)
    assert len(rated) == 1
    rated.expire(1.9)
    assert len(rated) == 1
    rated.expire(2.0)
    assert len(rated) == 0


def test_full_table_evicts_the_least_recently_seen_idle_client() -> None:
    table = ClientTable(max_rate=1, period=10.0, capacity=2)
    for key in (b"a", b"b"):
        admitted = table.admit(key, 0.0)
        assert isinstance(admitted, Client)
        table.release(admitted, 0.0)
    assert table.admit(b"a", 1.0) is Refusal.TOO_FAST  # seen again: b is now the oldest
    assert isinstance(table.admit(b"c", 2.0), Client)
    assert table.evicted == 1 and table.get(b"b") is None and table.get(b"a") is not None


def test_full_table_of_live_clients_fails_open() -> None:
    """Every live client holds a connection, so this happens only with a table smaller than
    max_connections; the newcomer is admitted untracked rather than locked out."""
    table = ClientTable(max_open=1, capacity=2)
    assert isinstance(table.admit(b"a", 0.0), Client)
    assert isinstance(table.admit(b"b", 0.0), Client)
    assert table.admit(b"c", 0.0) is None
    assert table.untracked == 1 and len(table) == 2
    assert table.admit(b"a", 0.0) is Refusal.TOO_MANY  # tracked clients are still limited


# -- properties -----------------------------------------------------------------------------------

# A step: admit a connection of client ``key``, or end one of the open ones (by index), after
# ``dt`` seconds.
steps = st.lists(st.tuples(st.booleans(), st.integers(0, 7), st.integers(0, 40),
                           st.floats(0, 0.6, allow_nan=False)), max_size=300)


@settings(max_examples=300, deadline=None)
@given(steps, st.integers(0, 3), st.integers(0, 4), st.integers(1, 10))
def test_limits_and_bound_hold(plan: list[tuple[bool, int, int, float]], max_open: int,
                               max_rate: int, capacity: int) -> None:
    """Whatever happens: no tracked client holds more than max_open, no period's bucket holds
    more than max_rate, the table never grows past its capacity, and counts return to zero."""
    period = 1.0
    table = ClientTable(max_open, max_rate, period, capacity)
    now = 0.0
    held: list[Client] = []
    untracked: list[bytes] = []
    for admit, key_index, pick, dt in plan:
        now += dt
        key = bytes([key_index])
        if admit or not held:
            live_before = len(table._live)
            verdict = table.admit(key, now)
            if verdict is None:
                assert live_before == capacity  # failing open only when full of live ones
                untracked.append(key)
            elif isinstance(verdict, Client):
                held.append(verdict)
        else:
            table.release(held.pop(pick % len(held)), now)
        assert len(table) <= capacity
        for client in {id(client): client for client in held}.values():
            assert table.get(client.key) is client
            assert client.open == sum(other is client for other in held)
            if max_open:
                assert client.open <= max_open
            if max_rate:
                assert client.current <= max_rate
                assert client.rate(now, period) <= max_rate + 1e-9
    for client in held:
        table.release(client, now)
    assert not table._live
    table.expire(now + 2.001 * period)
    assert len(table) == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 0.5, allow_nan=False), max_size=200), st.integers(1, 5))
def test_admitted_in_any_window(gaps: list[float], max_rate: int) -> None:
    """With room for everyone, the admitted connections of one client in any n periods are
    at most (n + 1) times the limit: under twice it in one sliding period."""
    period = 1.0
    table = ClientTable(max_rate=max_rate, period=period, capacity=4)
    now, admitted = 0.0, []
    for gap in gaps:
        now += gap
        verdict = table.admit(b"a", now)
        if isinstance(verdict, Client):
            admitted.append(now)
            table.release(verdict, now)
    for start in admitted:
        for periods in (1, 2, 3):
            inside = sum(start <= when < start + periods * period for when in admitted)
            assert inside <= (periods + 1) * max_rate


@pytest.mark.parametrize("capacity", [1, 64, 5000])
def test_a_flood_of_distinct_addresses_stays_within_the_bound(capacity: int) -> None:
    """100,000 distinct clients, each admitted and gone, with a rate limit that keeps them in
    the table while their window lasts: the table never holds more than its capacity."""
    admission = ClientAdmission(ClientTable(max_open=1, max_rate=10, period=60.0,
                                            capacity=capacity), ClientKeys(), lambda: now)
    now = 0.0
    for number in range(100_000):
        now = number * 1e-4
        packed = (0x20010DB8 << 96 | number << 64).to_bytes(16, "big")  # a /64 each
        assert admission.admit(number % 3, packed) is None
        assert len(admission.table) <= capacity
        admission.release(number % 3)
    assert admission.tracked == capacity
    assert admission.table.evicted == 100_000 - capacity


def test_admission_holds_by_descriptor_and_releases_once() -> None:
    now = 0.0
    admission = ClientAdmission(ClientTable(max_open=1), ClientKeys(), lambda: now)
    assert admission.admit_text(7, "192.0.2.1") is None
    assert admission.held(7) == ClientKeys().of_text("192.0.2.1")
    assert admission.admit_text(8, "192.0.2.1") is Refusal.TOO_MANY
    assert admission.held(8) is None
    admission.release(7)
    admission.release(7)  # a second release of the same connection changes nothing
    admission.release(8)  # nor does the release of one that was refused
    assert admission.tracked == 0
    assert admission.admit_text(9, "192.0.2.1") is None
    assert admission.admit_text(10, "unix peer") is None  # no address: not limited


def test_settings() -> None:
    assert ClientAdmission.for_listener(ListenerConfig()) is None  # off by default
    admission = ClientAdmission.for_listener(ListenerConfig(
        max_connections_per_client=3, max_connection_rate_per_client=5,
        client_rate_period=2.0, client_ipv6_prefix=48, client_table_size=10))
    assert admission is not None
    assert (admission.table.max_open, admission.table.max_rate, admission.table.period,
            admission.table.capacity) == (3, 5, 2.0, 10)
    assert admission.keys.ipv6_prefix == 48 and admission.keys.ipv4_prefix == 32
    with pytest.raises(ConfigError, match="needs a TCP listener"):
        ListenerConfig(path="/tmp/x.sock", max_connections_per_client=1)
    ListenerConfig(path="/tmp/x.sock", max_connections_per_client=1,
                   proxy_protocol="v1")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="client_ipv6_prefix"):
        ListenerConfig(client_ipv6_prefix=129)
