"""A small Redis-compatible server (RESP2): PING, ECHO, GET, SET, DEL, INCR, with pipelining.

Built only from portside's public API: ``MessageHandler`` with the RESP framer; ``DEBUG SLEEP``
is offloaded to the thread pool, and its reply still leaves in request order. The store is a
dict in each process (with several workers, each has its own).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from portside import CloseReason, Connection
from portside.errors import ProtocolError
from portside.messages import MessageHandler
from portside.protocols.resp import (
    Command,
    RespFramer,
    encode_array,
    encode_bulk,
    encode_error,
    encode_integer,
    encode_simple,
)

OK = encode_simple("OK")
PONG = encode_simple("PONG")


class RespHandler(MessageHandler[Command]):
    """Answers each RESP command; one store shared by every connection of this process."""

    def __init__(self) -> None:
        self.store: dict[bytes, bytes] = {}
        self.commands: dict[bytes, tuple[Callable[[Connection, Command], bytes | None], int]] = {
            # name: (implementation, arity as Redis states it: N exact, -N at least N)
            b"PING": (self.ping, -1), b"ECHO": (self.echo, 2), b"GET": (self.get, 2),
            b"SET": (self.set, 3), b"DEL": (self.delete, -2), b"INCR": (self.incr, 2),
            b"DBSIZE": (self.dbsize, 1), b"FLUSHALL": (self.flushall, -1),
            b"CONFIG": (self.config, -2), b"COMMAND": (self.command, -1),
            b"SELECT": (self.select, 2), b"QUIT": (self.quit, 1), b"DEBUG": (self.debug, -2),
        }

    def make_framer(self) -> RespFramer:
        return RespFramer()

    def encode_reply(self, conn: Connection, reply: bytes) -> list[bytes]:
        return [reply]

    def message_received(self, conn: Connection, message: Command) -> None:
        name = message[0].upper()
        entry = self.commands.get(name)
        if entry is None:
            shown = message[0][:64].decode(errors="replace")
            self.reply(conn, encode_error(f"ERR unknown command '{shown}'"))
            return
        implementation, arity = entry
        if (arity > 0 and len(message) != arity) or len(message) < -arity:
            self.reply(conn, encode_error(
                f"ERR wrong number of arguments for '{name.decode().lower()}' command"))
            return
        reply = implementation(conn, message)
        if reply is not None:  # None: the command replies itself (offloaded)
            self.reply(conn, reply)

    def protocol_error(self, conn: Connection, exc: ProtocolError) -> None:
        """As Redis does: an error reply, then close."""
        self.reply(conn, encode_error(f"ERR Protocol error: {exc}"))
        conn.close_for(CloseReason.PROTOCOL_ERROR)

    # -- commands --------------------------------------------------------------------------------

    def ping(self, conn: Connection, args: Command) -> bytes:
        if len(args) > 2:
            return encode_error("ERR wrong number of arguments for 'ping' command")
        return encode_bulk(args[1]) if len(args) == 2 else PONG

    def echo(self, conn: Connection, args: Command) -> bytes:
        return encode_bulk(args[1])

    def get(self, conn: Connection, args: Command) -> bytes:
        return encode_bulk(self.store.get(args[1]))

    def set(self, conn: Connection, args: Command) -> bytes:
        self.store[args[1]] = args[2]
        return OK

    def delete(self, conn: Connection, args: Command) -> bytes:
        return encode_integer(sum(self.store.pop(key, None) is not None for key in args[1:]))

    def incr(self, conn: Connection, args: Command) -> bytes:
        try:
            value = int(self.store.get(args[1], b"0")) + 1
        except ValueError:
            return encode_error("ERR value is not an integer or out of range")
        if not -(2**63) <= value < 2**63:
            return encode_error("ERR increment or decrement would overflow")
        self.store[args[1]] = b"%d" % value
        return encode_integer(value)

    def dbsize(self, conn: Connection, args: Command) -> bytes:
        return encode_integer(len(self.store))

    def flushall(self, conn: Connection, args: Command) -> bytes:
        self.store.clear()
        return OK

    def config(self, conn: Connection, args: Command) -> bytes:
        # redis-benchmark asks CONFIG GET save/appendonly at start: no settings to report.
        if args[1].upper() == b"GET":
            return encode_array([])
        return encode_error("ERR CONFIG subcommand not supported")

    def command(self, conn: Connection, args: Command) -> bytes:
        return encode_array([])

    def select(self, conn: Connection, args: Command) -> bytes:
        return OK if args[1] == b"0" else encode_error("ERR DB index is out of range")

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


def _sleep_then_ok(seconds: float) -> bytes:
    time.sleep(seconds)
    return OK
