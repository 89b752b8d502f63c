"""Admission per client: how many connections one client may hold open (nginx ``limit_conn``)
and how fast it may open new ones (HAProxy's stick-table ``conn_rate``), per listener.

Theory of operation. A client is its address cut to a prefix: IPv4 per /32 by default, IPv6
per /64 (what one host or one customer usually gets; an IPv4-mapped IPv6 address counts as
IPv4). The key is the family's tag byte and the prefix's bytes, so the compiled accept loop
can make it from the kernel's sockaddr without formatting an address.

The rate is HAProxy's two-bucket sliding window (``freq_ctr``): each client counts the
connections admitted in the current period and remembers the previous period's count, and the
rate is ``current + previous * (the part of the previous period still inside the last one)``.
A connection is admitted while that estimate, with it, stays within the limit. So a period's
bucket never holds more than the limit, and any ``n`` periods hold at most ``n + 1`` times it
(a burst at the end of one bucket and the start of the next: under twice the limit in one
sliding period, the price of two counters instead of a timestamp per connection). Refused
connections are not counted: the limit is on what the server takes, and a client that retries
in a loop is let in again at the limit's pace rather than locked out for good.

Memory is bounded: the table holds at most ``capacity`` clients. Clients with open connections
("live") are never dropped, since their counts must come back down when the connections close.
Clients without one are kept, least recently seen first, only while their rate window could
still refuse someone; they are dropped once it has passed, and when a new client needs room the
least recently seen of them makes way (its rate history is lost: memory wins over precision).
A table full of live clients cannot happen while ``capacity`` >= the listener's
``max_connections`` (each live client holds a connection). If it does, a new client is admitted
untracked (fail open) and counted: every address here finished a TCP handshake (or came from a
trusted balancer's PROXY header), so a table full of live clients is a flood of real open
connections, which ``max_connections`` bounds anyway; failing closed would let whoever holds the
table lock out every client it has not seen.

Sans-IO: no sockets and no clock of its own; the caller passes the time (``ClientTable``) or a
clock (``ClientAdmission``), so tests drive it by hand.
"""

from __future__ import annotations

import enum
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from portside.config import ListenerConfig

Clock = Callable[[], float]

_V4, _V6 = b"\x04", b"\x06"
_V4_MAPPED = bytes(10) + b"\xff\xff"  # ::ffff:a.b.c.d, how a dual-stack socket shows IPv4


class Refusal(enum.Enum):
    """Which limit refused a connection (the value names the setting)."""

    TOO_MANY = "max_connections_per_client"  #: the client holds that many open already
    TOO_FAST = "max_connection_rate_per_client"  #: the client opened that many this period


def _cut(prefix: int) -> tuple[int, int]:
    """The whole bytes a prefix keeps, and the mask of its partial byte (0: none)."""
    whole, bits = divmod(prefix, 8)
    return whole, (0xFF << (8 - bits)) & 0xFF if bits else 0


class ClientKeys:
    """Makes the table's key for an address: its family's tag and its prefix's bytes."""

    def __init__(self, ipv4_prefix: int = 32, ipv6_prefix: int = 64) -> None:
        if not 0 <= ipv4_prefix <= 32 or not 0 <= ipv6_prefix <= 128:
            raise ValueError("prefixes are 0-32 (IPv4) and 0-128 (IPv6) bits")
        self.ipv4_prefix, self.ipv6_prefix = ipv4_prefix, ipv6_prefix
        self._v4 = _cut(ipv4_prefix)
        self._v6 = _cut(ipv6_prefix)

    def of_packed(self, packed: bytes) -> bytes | None:
        """The key of a 4- or 16-byte address as the kernel gives it; None for other sizes."""
        if len(packed) == 16:
            if packed[:12] != _V4_MAPPED:
                whole, mask = self._v6
                tag = _V6
            else:
                packed = packed[12:]
                whole, mask = self._v4
                tag = _V4
        elif len(packed) == 4:
            whole, mask = self._v4
            tag = _V4
        else:
            return None
        key = tag + packed[:whole]
        if mask:
            key += bytes((packed[whole] & mask,))
        return key

    def of_text(self, host: str) -> bytes | None:
        """The key of an address written as text ("192.0.2.1", "2001:db8::1%eth0"); None
        when it is not an IP address."""
        host = host.partition("%")[0]  # a link-local address's zone is not part of it
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                return self.of_packed(socket.inet_pton(family, host))
            except (OSError, ValueError):
                continue
        return None


def describe_key(key: bytes) -> str:
    """A key as an operator reads it: "192.0.2.7" or "2001:db8:1:2::/64"."""
    prefix = (len(key) - 1) * 8
    if key[:1] == _V4:
        text = socket.inet_ntop(socket.AF_INET, key[1:].ljust(4, b"\0"))
        return text if prefix >= 32 else f"{text}/{prefix}"
    text = socket.inet_ntop(socket.AF_INET6, key[1:].ljust(16, b"\0"))
    return text if prefix >= 128 else f"{text}/{prefix}"


class Client:
    """One client's counts: open connections, and its two rate buckets."""

    __slots__ = ("current", "key", "open", "previous", "start")

    def __init__(self, key: bytes, now: float) -> None:
        self.key = key
        self.open = 0
        self.start = now  # the current bucket's start; buckets are one period long
        self.current = 0  # admitted in the current bucket
        self.previous = 0  # admitted in the bucket before it

    def roll(self, now: float, period: float) -> None:
        """Move the buckets on to the one ``now`` falls in."""
        elapsed = now - self.start
        if elapsed < period:
            return
        self.previous = self.current if elapsed < 2 * period else 0
        self.current = 0
        self.start += (elapsed // period) * period

    def rate(self, now: float, period: float) -> float:
        """The sliding-window estimate of connections admitted in the last period."""
        self.roll(now, period)
        into = min(max(now - self.start, 0.0), period)
        return self.current + self.previous * (period - into) / period


class ClientTable:
    """Open connections and admission rate per client key, for at most ``capacity`` clients.

    ``max_open`` and ``max_rate`` (per ``period`` seconds) are limits, 0 meaning none.
    """

    def __init__(self, max_open: int = 0, max_rate: int = 0, period: float = 1.0,
                 capacity: int = 16_384) -> None:
        if capacity < 1 or period <= 0 or max_open < 0 or max_rate < 0:
            raise ValueError("capacity >= 1, period > 0, limits >= 0")
        self.max_open, self.max_rate, self.period = max_open, max_rate, period
        self.capacity = capacity
        self._live: dict[bytes, Client] = {}  # clients with open connections
        #: Clients without one whose rate window may still refuse, least recently seen first.
        self._idle: OrderedDict[bytes, Client] = OrderedDict()
        self.refused = 0
        self.evicted = 0  # idle clients dropped to make room before their window had passed
        self.untracked = 0  # admitted without a row, the table being full of live clients

    def __len__(self) -> int:
        return len(self._live) + len(self._idle)

    def get(self, key: bytes) -> Client | None:
        return self._live.get(key) or self._idle.get(key)

    def admit(self, key: bytes, now: float) -> Client | Refusal | None:
        """Admit one new connection of ``key`` at ``now``: its ``Client`` (give it to
        ``release`` when the connection ends), a ``Refusal``, or None when it was admitted
        untracked (the table full of live clients; nothing to release)."""
        self.expire(now)
        client = self._live.get(key)
        if client is None:
            client = self._idle.pop(key, None)
            if client is None:
                if len(self) >= self.capacity:
                    if not self._idle:
                        self.untracked += 1
                        return None
                    self._idle.popitem(last=False)
                    self.evicted += 1
                client = Client(key, now)
        refusal = None
        if self.max_open and client.open >= self.max_open:
            refusal = Refusal.TOO_MANY
        elif self.max_rate and client.rate(now, self.period) + 1 > self.max_rate:
            refusal = Refusal.TOO_FAST
        if refusal is not None:
            self.refused += 1
            if not client.open:
                self._idle[key] = client  # seen just now: the last to make way
            return refusal
        if self.max_rate:
            client.roll(now, self.period)
            client.current += 1
        client.open += 1
        self._live[key] = client
        return client

    def release(self, client: Client, now: float) -> None:
        """One connection of ``client`` has ended."""
        client.open -= 1
        if client.open > 0:
            return
        if self._live.get(client.key) is client:
            del self._live[client.key]
            if self.max_rate and not self._passed(client, now):
                self._idle[client.key] = client

    def _passed(self, client: Client, now: float) -> bool:
        """Whether ``client``'s rate window can no longer refuse anyone: both buckets over."""
        return now - client.start >= 2 * self.period

    def expire(self, now: float) -> None:
        """Drop idle clients whose window has passed, from the least recently seen on (a
        later one may have passed too; it goes when it reaches the front, or makes way)."""
        idle = self._idle
        while idle:
            client = next(iter(idle.values()))
            if not self._passed(client, now):
                return
            idle.popitem(last=False)


class ClientAdmission:
    """One listener's admission: its ``ClientTable``, its key rule, and which connection (by
    its descriptor, unique while it is open) holds a place in which client's count."""

    def __init__(self, table: ClientTable, keys: ClientKeys,
                 clock: Clock = time.monotonic) -> None:
        self.table = table
        self.keys = keys
        self.clock = clock
        self._held: dict[int, Client] = {}
        #: Called with the key of a client admitted untracked, the table being full of live
        #: clients (the listener logs it: the table is smaller than it should be).
        self.on_full: Callable[[bytes], None] | None = None

    @classmethod
    def for_listener(cls, config: ListenerConfig) -> ClientAdmission | None:
        """The admission ``config`` asks for; None when both limits are off."""
        if not config.max_connections_per_client and not config.max_connection_rate_per_client:
            return None
        return cls(ClientTable(config.max_connections_per_client,
                               config.max_connection_rate_per_client,
                               config.client_rate_period, config.client_table_size),
                   ClientKeys(config.client_ipv4_prefix, config.client_ipv6_prefix))

    @property
    def tracked(self) -> int:
        """Clients in the table now. Read-only, as statistics may be read from any thread:
        clients whose rate window has passed are dropped by the next admission."""
        return len(self.table)

    @property
    def refused(self) -> int:
        return self.table.refused

    def admit(self, holder: int, packed: bytes) -> Refusal | None:
        """Admit the connection on descriptor ``holder`` from a packed address (4 or 16
        bytes): None when admitted, else why not."""
        key = self.keys.of_packed(packed)
        return self._admit(holder, key) if key is not None else None

    def admit_text(self, holder: int, host: str) -> Refusal | None:
        """``admit`` for an address written as text (a peer tuple's host, a PROXY source)."""
        key = self.keys.of_text(host)
        return self._admit(holder, key) if key is not None else None

    def _admit(self, holder: int, key: bytes) -> Refusal | None:
        verdict = self.table.admit(key, self.clock())
        if isinstance(verdict, Refusal):
            return verdict
        stale = self._held.pop(holder, None)
        if stale is not None:  # never expected: a descriptor reused without a release
            self.table.release(stale, self.clock())
        if verdict is not None:
            self._held[holder] = verdict
        elif self.on_full is not None:
            self.on_full(key)
        return None

    def release(self, holder: int) -> None:
        """The connection on ``holder`` has ended (a no-op if it held no place: refused,
        untracked, or never checked); safe to call more than once."""
        client = self._held.pop(holder, None)
        if client is not None:
            self.table.release(client, self.clock())

    def held(self, holder: int) -> bytes | None:
        """The key ``holder`` counts against, if any (for tests and logs)."""
        client = self._held.get(holder)
        return client.key if client is not None else None
