"""Handlers for process tests, loaded with ``portside serve handlers:NAME`` (tests/ on the path)."""

from __future__ import annotations

import os
import threading
import time

from portside import Connection, Server
from portside.examples.echo import EchoHandler


class StuckHandler(EchoHandler):
    """Echoes, but b"hang" blocks the worker's loop, as a handler bug would."""

    def data_received(self, conn: Connection, data: memoryview) -> None:
        if bytes(data) == b"hang":
            time.sleep(3600)
        super().data_received(conn, data)


class CrashingHandler(EchoHandler):
    """Dies soon after its worker starts serving: the supervisor must back off, not fork in a
    loop."""

    def server_started(self, server: Server) -> None:
        # After the worker's first answer to the supervisor, so it counts as booted.
        threading.Timer(0.3, os._exit, (3,)).start()


class PeerEcho(EchoHandler):
    """Says who it thinks the client is (the PROXY header's source), then echoes."""

    def connection_made(self, conn: Connection, first_data: memoryview | None) -> None:
        host, port = conn.peer_address[:2]
        conn.write(f"peer {host} {port} pid {os.getpid()}\n".encode())
        super().connection_made(conn, first_data)


class NeverBoots(EchoHandler):
    """Its constructor fails in every worker: the supervisor must give up, not respawn."""

    def __init__(self) -> None:
        raise RuntimeError("the database is not there")


class Miscounted(EchoHandler):
    """Echoes, with the server's count of open connections one too high from the start: the
    state a bug left a server in (issue 17: a relay whose double close drove the count wrong),
    which a forced shutdown must end all the same."""

    def server_started(self, server: Server) -> None:
        core = server._core
        assert core is not None
        core.open += 1
