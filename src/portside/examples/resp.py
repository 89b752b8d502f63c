"""A small Redis-compatible server: strings with expiry, RESP2 and RESP3, pipelining.

Built only from portside's public API: ``MessageHandler`` with the RESP framer. It answers what
clients send in ordinary use of the commands it has (redis-py's default ``HELLO 3`` and
``CLIENT SETINFO``, redis-cli's ``COMMAND DOCS``, redis-benchmark's ``CONFIG GET``), with
Redis's own error texts, so ``redis.Redis(port=6380)`` works as it does against Redis.

Commands: PING ECHO GET SET (NX XX GET EX PX KEEPTTL) GETDEL DEL UNLINK EXISTS MGET MSET INCR
INCRBY DECR DECRBY EXPIRE PEXPIRE (NX XX GT LT) TTL PTTL PERSIST DBSIZE FLUSHALL FLUSHDB SELECT
HELLO CLIENT (SETINFO SETNAME GETNAME ID) CONFIG GET, COMMAND, MULTI EXEC DISCARD (redis-py's
default pipeline is a transaction), QUIT, and DEBUG SLEEP, which is offloaded to the thread
pool while its reply still leaves in request order.

Expiry, as Redis does it: a key past its deadline is gone for every command that looks at it
(lazy), and a heap of deadlines, checked at each read, reclaims expired keys in deadline order,
at most ``EXPIRE_BATCH`` per read: never a scan of all keys. Stale heap entries (a key whose
deadline changed) are skipped when they surface and dropped when they outnumber live ones.
The store is a dict in each process (with several workers, each has its own).

The hot path. The example's framer, ``StoreFramer`` (``_resp_store.pyx``: the compiled RESP
framer, ``protocols/_resp.pyx``, with one hook overridden), is an ``AnsweringFramer``: through
``MessageHandler``'s public fast path it is handed each read, answers the plain forms of PING,
ECHO, GET, SET, INCR and DECR in C on ``store`` and ``expires`` and returns one reply buffer:
a pipelined read of those costs one Python call and one send. Every other command, form or
case (a key with a time to live, errors, replies past high water; anything inside MULTI, by
``framer_may_answer``) is handed back to ``message_received`` and the methods below, which
stay the reference for what the fast path answers (a differential test holds them to it).
Where ``_resp_store`` is not built, the framer is ``new_framer()``'s and every command runs
here.
"""

from __future__ import annotations

import heapq
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from portside import Connection, Framer, MessageHandler, ProtocolError
from portside.protocols.resp import (
    NULL2,
    NULL3,
    Command,
    encode_array,
    encode_bulk,
    encode_error,
    encode_integer,
    encode_map,
    encode_simple,
    new_framer,
)

try:
    from portside.examples._resp_store import StoreFramer
except ImportError as exc:  # not built (no compiler at install time) or built for another Python
    StoreFramer = None  # type: ignore[assignment,misc]
    _store_framer_error = str(exc)
else:
    _store_framer_error = ""

logger = logging.getLogger("portside")

OK = encode_simple("OK")
PONG = encode_simple("PONG")
EMPTY_ARRAY = b"*0\r\n"
QUEUED = encode_simple("QUEUED")
SYNTAX = encode_error("ERR syntax error")
NOT_INTEGER = encode_error("ERR value is not an integer or out of range")
LLONG_MAX = 2**63 - 1
LLONG_MIN = -(2**63)
EXPIRE_BATCH = 1000  # expired keys reclaimed per read at most, as Redis bounds its expire cycle
_TRANSACTION_CONTROL = frozenset({b"MULTI", b"EXEC", b"DISCARD", b"QUIT"})
_NOT_IN_MULTI = frozenset({b"DEBUG", b"HELLO"})  # offloaded, or changes how replies are encoded
_INTEGER = re.compile(rb"0|-?[1-9][0-9]{0,18}")  # Redis's string2ll: no sign, spaces, zeros

Implementation = Callable[[Connection, Command], bytes | None]


@dataclass(slots=True)
class Client:
    """Per-connection state (``conn.user_data``): the protocol version and the client's name."""

    resp3: bool = False
    name: bytes = b""
    #: Inside MULTI: the commands queued for EXEC (None outside), and whether one was refused.
    queued: list[Command] | None = None
    dirty: bool = False


def parse_integer(text: bytes) -> int | None:
    """``text`` as a 64-bit integer, as strictly as Redis reads one; None if it is not one."""
    if _INTEGER.fullmatch(text) is None:
        return None
    value = int(text)
    return value if LLONG_MIN <= value <= LLONG_MAX else None


def now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class RespHandler(MessageHandler[Command]):
    """Answers each RESP command; one store shared by every connection of this process."""

    def __init__(self) -> None:
        if StoreFramer is None:
            logger.warning("compiled RESP fast path unavailable (%s); every command runs in "
                           "Python", _store_framer_error)
        self.store: dict[bytes, bytes] = {}
        #: Keys with a time to live: their deadline (monotonic milliseconds).
        self.expires: dict[bytes, int] = {}
        self._deadlines: list[tuple[int, bytes]] = []  # a heap; may hold stale entries
        # name: (implementation, arity as Redis states it: N exact, -N at least N)
        self.commands: dict[bytes, tuple[Implementation, int]] = {
            b"PING": (self.ping, -1), b"ECHO": (self.echo, 2), b"GET": (self.get, 2),
            b"SET": (self.set, -3), b"GETDEL": (self.getdel, 2), b"DEL": (self.delete, -2),
            b"UNLINK": (self.delete, -2), b"EXISTS": (self.exists, -2),
            b"MGET": (self.mget, -2), b"MSET": (self.mset, -3),
            b"INCR": (self.incr, 2), b"DECR": (self.decr, 2), b"INCRBY": (self.incrby, 3),
            b"DECRBY": (self.decrby, 3), b"EXPIRE": (self.expire, -3),
            b"PEXPIRE": (self.pexpire, -3), b"TTL": (self.ttl, 2), b"PTTL": (self.pttl, 2),
            b"PERSIST": (self.persist, 2), b"DBSIZE": (self.dbsize, 1),
            b"FLUSHALL": (self.flushall, -1), b"FLUSHDB": (self.flushall, -1),
            b"CONFIG": (self.config, -2), b"COMMAND": (self.command, -1),
            b"SELECT": (self.select, 2), b"HELLO": (self.hello, -1),
            b"CLIENT": (self.client, -2), b"QUIT": (self.quit, -1), b"DEBUG": (self.debug, -2),
            b"MULTI": (self.multi, 1), b"EXEC": (self.exec, 1), b"DISCARD": (self.discard, 1),
        }

    def make_framer(self) -> Framer[Command]:
        if StoreFramer is None:
            return new_framer()
        return StoreFramer(self.store, self.expires)

    def encode_reply(self, conn: Connection, reply: bytes) -> list[bytes]:
        return [reply]

    def connection_made(self, conn: Connection, first_data: memoryview | None) -> None:
        conn.user_data = Client()
        super().connection_made(conn, first_data)

    def data_received(self, conn: Connection, data: memoryview) -> None:
        """Reclaim expired keys (at most EXPIRE_BATCH) when one is due, then read as usual."""
        deadlines = self._deadlines
        if deadlines and deadlines[0][0] <= now_ms():
            self.reclaim_expired(now_ms())
        super().data_received(conn, data)

    def framer_may_answer(self, conn: Connection) -> bool:
        """Not inside MULTI: there every command is queued for EXEC."""
        client: Client = conn.user_data
        return client.queued is None

    def message_received(self, conn: Connection, message: Command) -> None:
        name = message[0].upper()
        entry = self.commands.get(name)
        if entry is None:
            shown = b"".join(b"'%s' " % arg[:128] for arg in message[1:4])
            self.refuse(conn, encode_error(
                f"ERR unknown command '{message[0][:128].decode(errors='replace')}', "
                f"with args beginning with: {shown.decode(errors='replace')}"))
            return
        implementation, arity = entry
        if (arity > 0 and len(message) != arity) or len(message) < -arity:
            self.refuse(conn, wrong_arity(name.decode().lower()))
            return
        client: Client = conn.user_data
        if client.queued is not None and name not in _TRANSACTION_CONTROL:
            if name in _NOT_IN_MULTI:
                self.refuse(conn, encode_error(
                    f"ERR Command not allowed inside a transaction ('{name.decode().lower()}')"))
                return
            client.queued.append(message)
            self.reply(conn, QUEUED)
            return
        reply = implementation(conn, message)
        if reply is not None:  # None: the command replies itself (offloaded, QUIT)
            self.reply(conn, reply)

    def refuse(self, conn: Connection, error: bytes) -> None:
        """An error for a command that did not run; inside MULTI it also dooms the EXEC."""
        client: Client = conn.user_data
        if client.queued is not None:
            client.dirty = True
        self.reply(conn, error)

    def protocol_error(self, conn: Connection, exc: ProtocolError) -> None:
        """As Redis does: an error reply, then close (and one log line)."""
        self.reply(conn, encode_error(f"ERR Protocol error: {exc}"))
        super().protocol_error(conn, exc)

    # -- the keyspace ----------------------------------------------------------------------------

    def lookup(self, key: bytes) -> bytes | None:
        """The value of ``key``, or None if it is missing or expired (then it is deleted)."""
        if self.expires and (deadline := self.expires.get(key)) is not None \
                and deadline <= now_ms():
            self.remove(key)
            return None
        return self.store.get(key)

    def remove(self, key: bytes) -> bool:
        self.expires.pop(key, None)
        return self.store.pop(key, None) is not None

    def put(self, key: bytes, value: bytes, deadline: int | None = None,
            keep_ttl: bool = False) -> None:
        """Set ``key``; its time to live becomes ``deadline`` (None: none) unless kept."""
        self.store[key] = value
        if deadline is not None:
            self.set_deadline(key, deadline)
        elif not keep_ttl and self.expires:
            self.expires.pop(key, None)

    def set_deadline(self, key: bytes, deadline: int) -> None:
        self.expires[key] = deadline
        heapq.heappush(self._deadlines, (deadline, key))
        if len(self._deadlines) > 2 * len(self.expires) + 1024:
            # Mostly stale entries (deadlines changed or removed): rebuild from the live ones.
            self._deadlines = [(due, name) for name, due in self.expires.items()]
            heapq.heapify(self._deadlines)

    def reclaim_expired(self, now: int) -> int:
        """Delete keys whose deadline has passed, earliest first, at most EXPIRE_BATCH."""
        deadlines, expires, store = self._deadlines, self.expires, self.store
        reclaimed = 0
        while deadlines and deadlines[0][0] <= now and reclaimed < EXPIRE_BATCH:
            due, key = heapq.heappop(deadlines)
            if expires.get(key) == due:  # else stale: the key's deadline changed or it went
                del expires[key]
                del store[key]
                reclaimed += 1
        return reclaimed

    # -- commands --------------------------------------------------------------------------------

    def ping(self, conn: Connection, args: Command) -> bytes:
        if len(args) > 2:
            return wrong_arity("ping")
        return encode_bulk(args[1]) if len(args) == 2 else PONG

    def echo(self, conn: Connection, args: Command) -> bytes:
        return encode_bulk(args[1])

    def get(self, conn: Connection, args: Command) -> bytes:
        value = self.lookup(args[1])
        if value is None:
            return NULL3 if conn.user_data.resp3 else NULL2
        return b"$%d\r\n%s\r\n" % (len(value), value)

    def set(self, conn: Connection, args: Command) -> bytes:
        """SET key value [NX | XX] [GET] [EX seconds | PX milliseconds | KEEPTTL]"""
        key, value = args[1], args[2]
        if len(args) == 3:  # the common case, without options
            self.put(key, value)
            return OK
        condition = b""
        get = keep_ttl = False
        unit = b""
        amount = 0
        at = 3
        while at < len(args):
            option = args[at].upper()
            if option in (b"NX", b"XX") and not condition:
                condition = option
            elif option == b"GET" and not get:
                get = True
            elif option == b"KEEPTTL" and not unit and not keep_ttl:
                keep_ttl = True
            elif option in (b"EX", b"PX") and not unit and not keep_ttl and at + 1 < len(args):
                unit = option
                at += 1
                number = parse_integer(args[at])
                if number is None:
                    return NOT_INTEGER
                amount = number
            else:
                return SYNTAX
            at += 1
        deadline = None
        if unit:
            deadline = expire_deadline(amount, unit == b"EX")
            if deadline is None:
                return encode_error("ERR invalid expire time in 'set' command")
        old = self.lookup(key)
        null = NULL3 if conn.user_data.resp3 else NULL2
        reply = encode_bulk(old, null) if get else OK
        if (condition == b"NX" and old is not None) or (condition == b"XX" and old is None):
            return reply if get else null
        self.put(key, value, deadline, keep_ttl)
        return reply

    def getdel(self, conn: Connection, args: Command) -> bytes:
        value = self.lookup(args[1])
        if value is not None:
            self.remove(args[1])
        return encode_bulk(value, NULL3 if conn.user_data.resp3 else NULL2)

    def delete(self, conn: Connection, args: Command) -> bytes:
        return encode_integer(sum(self.lookup(key) is not None and self.remove(key)
                                  for key in args[1:]))

    def exists(self, conn: Connection, args: Command) -> bytes:
        return encode_integer(sum(self.lookup(key) is not None for key in args[1:]))

    def mget(self, conn: Connection, args: Command) -> bytes:
        return encode_array([self.lookup(key) for key in args[1:]],
                            NULL3 if conn.user_data.resp3 else NULL2)

    def mset(self, conn: Connection, args: Command) -> bytes:
        if len(args) % 2 != 1:
            return wrong_arity("mset")
        for at in range(1, len(args), 2):
            self.put(args[at], args[at + 1])
        return OK

    def incr(self, conn: Connection, args: Command) -> bytes:
        return self._add(args[1], 1)

    def decr(self, conn: Connection, args: Command) -> bytes:
        return self._add(args[1], -1)

    def incrby(self, conn: Connection, args: Command) -> bytes:
        by = parse_integer(args[2])
        return NOT_INTEGER if by is None else self._add(args[1], by)

    def decrby(self, conn: Connection, args: Command) -> bytes:
        by = parse_integer(args[2])
        if by is None:
            return NOT_INTEGER
        if by == LLONG_MIN:
            return encode_error("ERR decrement would overflow")
        return self._add(args[1], -by)

    def _add(self, key: bytes, by: int) -> bytes:
        old = self.lookup(key)
        current = 0 if old is None else parse_integer(old)
        if current is None:
            return NOT_INTEGER
        value = current + by
        if not LLONG_MIN <= value <= LLONG_MAX:
            return encode_error("ERR increment or decrement would overflow")
        self.store[key] = b"%d" % value  # as in Redis, the time to live is kept
        return encode_integer(value)

    def expire(self, conn: Connection, args: Command) -> bytes:
        return self._expire(args, seconds=True)

    def pexpire(self, conn: Connection, args: Command) -> bytes:
        return self._expire(args, seconds=False)

    def _expire(self, args: Command, seconds: bool) -> bytes:
        """EXPIRE/PEXPIRE key time [NX | XX | GT | LT]"""
        amount = parse_integer(args[2])
        if amount is None:
            return NOT_INTEGER
        flags = set()
        for option in args[3:]:
            flag = option.upper()
            if flag not in (b"NX", b"XX", b"GT", b"LT"):
                return encode_error(f"ERR Unsupported option {option.decode(errors='replace')}")
            flags.add(flag)
        if b"NX" in flags and len(flags) > 1:
            return encode_error(
                "ERR NX and XX, GT or LT options at the same time are not compatible")
        if b"GT" in flags and b"LT" in flags:
            return encode_error("ERR GT and LT options at the same time are not compatible")
        name = "expire" if seconds else "pexpire"
        if seconds and abs(amount) > LLONG_MAX // 1000:
            return encode_error(f"ERR invalid expire time in '{name}' command")
        milliseconds = amount * 1000 if seconds else amount
        if milliseconds > LLONG_MAX - int(time.time() * 1000):
            return encode_error(f"ERR invalid expire time in '{name}' command")
        key = args[1]
        if self.lookup(key) is None:
            return encode_integer(0)
        deadline = now_ms() + milliseconds
        current = self.expires.get(key)
        if ((b"NX" in flags and current is not None) or (b"XX" in flags and current is None)
                or (b"GT" in flags and (current is None or deadline <= current))
                or (b"LT" in flags and current is not None and deadline >= current)):
            return encode_integer(0)
        if milliseconds <= 0:
            self.remove(key)  # a time in the past deletes the key, as in Redis
        else:
            self.set_deadline(key, deadline)
        return encode_integer(1)

    def ttl(self, conn: Connection, args: Command) -> bytes:
        return self._ttl(args[1], milliseconds=False)

    def pttl(self, conn: Connection, args: Command) -> bytes:
        return self._ttl(args[1], milliseconds=True)

    def _ttl(self, key: bytes, milliseconds: bool) -> bytes:
        if self.lookup(key) is None:
            return encode_integer(-2)
        deadline = self.expires.get(key)
        if deadline is None:
            return encode_integer(-1)
        left = max(deadline - now_ms(), 0)
        return encode_integer(left if milliseconds else (left + 500) // 1000)

    def persist(self, conn: Connection, args: Command) -> bytes:
        if self.lookup(args[1]) is None:
            return encode_integer(0)
        return encode_integer(int(self.expires.pop(args[1], None) is not None))

    def dbsize(self, conn: Connection, args: Command) -> bytes:
        return encode_integer(len(self.store))

    def flushall(self, conn: Connection, args: Command) -> bytes:
        self.store.clear()
        self.expires.clear()
        self._deadlines.clear()
        return OK

    def config(self, conn: Connection, args: Command) -> bytes:
        # redis-benchmark asks CONFIG GET save/appendonly at start: no settings to report.
        if args[1].upper() == b"GET":
            return b"%0\r\n" if conn.user_data.resp3 else EMPTY_ARRAY
        return encode_error("ERR CONFIG subcommand not supported")

    def command(self, conn: Connection, args: Command) -> bytes:
        return EMPTY_ARRAY  # redis-cli asks COMMAND DOCS for its hints: it has none here

    def select(self, conn: Connection, args: Command) -> bytes:
        index = parse_integer(args[1])
        if index is None:
            return NOT_INTEGER
        return OK if index == 0 else encode_error("ERR DB index is out of range")

    def hello(self, conn: Connection, args: Command) -> bytes:
        """HELLO [protover [AUTH username password] [SETNAME clientname]]"""
        client: Client = conn.user_data
        resp3 = client.resp3
        if len(args) > 1:
            version = parse_integer(args[1])
            if version is None:
                return encode_error("ERR Protocol version is not an integer or out of range")
            if version not in (2, 3):
                return encode_error("NOPROTO unsupported protocol version")
            resp3 = version == 3
        name = client.name
        at = 2
        while at < len(args):
            option = args[at].upper()
            if option == b"AUTH" and at + 2 < len(args):
                if args[at + 1] != b"default":  # no users here but the passwordless default
                    return encode_error(
                        "WRONGPASS invalid username-password pair or user is disabled.")
                at += 3
            elif option == b"SETNAME" and at + 1 < len(args):
                name = args[at + 1]
                at += 2
            else:
                return encode_error(
                    f"ERR Syntax error in HELLO option '{args[at].decode(errors='replace')}'")
        client.resp3, client.name = resp3, name
        framer = self.framer(conn)
        if StoreFramer is not None and isinstance(framer, StoreFramer):
            framer.resp3 = resp3  # its nulls
        # What Redis 7.0 answers: clients may look for these fields.
        return encode_map({
            b"server": encode_bulk(b"redis"), b"version": encode_bulk(b"7.0.0"),
            b"proto": encode_integer(3 if resp3 else 2), b"id": encode_integer(conn.id),
            b"mode": encode_bulk(b"standalone"), b"role": encode_bulk(b"master"),
            b"modules": EMPTY_ARRAY,
        }, resp3)

    def client(self, conn: Connection, args: Command) -> bytes:
        """CLIENT SETINFO | SETNAME | GETNAME | ID; other subcommands get Redis's error."""
        client: Client = conn.user_data
        sub = args[1].upper()
        if sub == b"SETINFO":
            if len(args) != 4:
                return wrong_arity("client|setinfo")
            if args[2].upper() not in (b"LIB-NAME", b"LIB-VER"):
                return encode_error(
                    f"ERR Unrecognized option '{args[2].decode(errors='replace')}'")
            return OK
        if sub == b"SETNAME":
            if len(args) != 3:
                return wrong_arity("client|setname")
            if any(byte <= 32 or byte > 126 for byte in args[2]):
                return encode_error(
                    "ERR Client names cannot contain spaces, newlines or special characters.")
            client.name = args[2]
            return OK
        if sub == b"GETNAME" and len(args) == 2:
            return encode_bulk(client.name or None, NULL3 if client.resp3 else NULL2)
        if sub == b"ID" and len(args) == 2:
            return encode_integer(conn.id)
        shown = args[1].decode(errors="replace")
        return encode_error(f"ERR unknown subcommand '{shown}'. Try CLIENT HELP.")

    def multi(self, conn: Connection, args: Command) -> bytes:
        client: Client = conn.user_data
        if client.queued is not None:
            return encode_error("ERR MULTI calls can not be nested")
        client.queued, client.dirty = [], False
        return OK

    def exec(self, conn: Connection, args: Command) -> bytes:
        """Run the queued commands at once: on one loop, nothing can come between them."""
        client: Client = conn.user_data
        queued, client.queued = client.queued, None
        if queued is None:
            return encode_error("ERR EXEC without MULTI")
        if client.dirty:
            return encode_error(
                "EXECABORT Transaction discarded because of previous errors.")
        replies = []
        for command in queued:
            reply = self.commands[command[0].upper()][0](conn, command)
            replies.append(reply if reply is not None else OK)
        return b"*%d\r\n" % len(replies) + b"".join(replies)

    def discard(self, conn: Connection, args: Command) -> bytes:
        client: Client = conn.user_data
        if client.queued is None:
            return encode_error("ERR DISCARD without MULTI")
        client.queued = None
        return OK

    def quit(self, conn: Connection, args: Command) -> None:
        self.reply(conn, OK)
        conn.close()

    def debug(self, conn: Connection, args: Command) -> bytes | None:
        """DEBUG SLEEP seconds: slow work, offloaded so the loop keeps serving everyone."""
        if args[1].upper() != b"SLEEP" or len(args) != 3:
            return encode_error("ERR DEBUG subcommand not supported (only SLEEP)")
        try:
            seconds = float(args[2])
        except ValueError:
            return encode_error("ERR value is not a valid float")
        self.offload(conn, _sleep_then_ok, max(0.0, min(seconds, 60.0)))
        return None


def wrong_arity(name: str) -> bytes:
    return encode_error(f"ERR wrong number of arguments for '{name}' command")


def expire_deadline(amount: int, seconds: bool) -> int | None:
    """The deadline for ``SET ... EX/PX amount``, or None where Redis says "invalid expire"."""
    if amount <= 0 or (seconds and amount > LLONG_MAX // 1000):
        return None
    milliseconds = amount * 1000 if seconds else amount
    if milliseconds > LLONG_MAX - int(time.time() * 1000):
        return None
    return now_ms() + milliseconds


def _sleep_then_ok(seconds: float) -> bytes:
    time.sleep(seconds)
    return OK
